"""model.bagel.vit_pretrain: the tiny release's ViT pretrained on the subject world's exact per-token labels."""
import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.scene import COLOURS, OBJECT_CATEGORIES, TEXTURES, Placement, Scene, Subject
from model.bagel.config import preset
from model.bagel.vit_pretrain import (TOKEN_ATTRIBUTES, accuracy, draw_images, fresh_vit, pretrain_vit,
                                      token_labels)

torch.set_num_threads(1)
VIT = preset("tiny").vit


def test_each_token_is_labelled_by_the_subject_covering_it_and_the_rest_is_background():
    subject = Subject(uid="s", domain="object", category="square", colour="blue", texture="striped")
    # a square filling the top-left 16 x 16 pixels: tokens (0, 0), (0, 1), (1, 0), (1, 1) of the 4 x 4 grid
    scene = Scene(background="beach", placements=(Placement(subject, (0, 0, 16, 16)),), size=32)
    labels = token_labels(scene, 4)
    covered = np.zeros((4, 4), dtype=bool)
    covered[:2, :2] = True
    expected = {"colour": list(COLOURS).index("blue") + 1, "category": OBJECT_CATEGORIES.index("square") + 1,
                "texture": TEXTURES.index("striped") + 1}
    for attr in TOKEN_ATTRIBUTES:
        grid = labels[attr].reshape(4, 4)
        assert (grid[covered] == expected[attr]).all(), attr
        assert (grid[~covered] == 0).all(), attr


def test_the_drawn_images_are_a_function_of_the_seed_and_stream():
    cfg = DataConfig()
    a = draw_images(cfg, "vit_pretrain", 8, 32, VIT.patch_size)
    b = draw_images(cfg, "vit_pretrain", 8, 32, VIT.patch_size)
    c = draw_images(cfg, "vit_heldout", 8, 32, VIT.patch_size, split="heldout")
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.tokens["colour"], b.tokens["colour"])
    assert not torch.equal(a.pixels, c.pixels)
    assert a.pixels.shape == (8, 3, 32, 32) and a.pixels.min() >= -1 and a.pixels.max() <= 1
    assert all(v.shape == (8, 16) for v in a.tokens.values())
    assert (a.tokens["colour"] > 0).any() and (a.tokens["colour"] == 0).any()  # subjects and background


def test_a_short_pretraining_reads_colour_and_scene_far_above_chance_on_held_out_combinations():
    cfg = DataConfig()
    train = draw_images(cfg, "vit_pretrain", 512, 32, VIT.patch_size)
    heldout = draw_images(cfg, "vit_heldout", 128, 32, VIT.patch_size, split="heldout")
    vit = fresh_vit(VIT, 0)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    metrics = pretrain_vit(vit, train, heldout, patch=VIT.patch_size, steps=200, batch_size=32, lr=2e-3, seed=0,
                           progress=False)
    held = metrics["heldout"]
    # chance on subject tokens: one colour in len(COLOURS) + background; scenes: one in four or so
    assert held["colour_subject_tokens"] > 0.6, held
    assert held["scene"] > 0.8, held
    assert metrics["curve"][-1]["loss"] < metrics["curve"][0]["loss"] / 2
    assert any(not torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert not vit.training


def test_the_same_seed_gives_the_same_vit():
    cfg = DataConfig()
    train = draw_images(cfg, "vit_pretrain", 64, 32, VIT.patch_size)
    runs = []
    for _ in range(2):
        vit = fresh_vit(VIT, 5)
        pretrain_vit(vit, train, None, patch=VIT.patch_size, steps=5, batch_size=16, lr=1e-3, seed=5, progress=False)
        runs.append(vit.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
