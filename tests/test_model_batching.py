"""Scone-S2I rows -> examples -> padded batches."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.batching import Example, collate, examples_from_rows
from model.config import ModelConfig
from model.tokenizer import build_tokenizer

CFG = ModelConfig(max_text_len=6)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _img(value: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_rows_decode_to_examples_with_one_question():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    qa = [["is there a red circle", "yes"], ["is the background a beach", "no"], ["is there a robot", "no"]]
    rows = [
        {"image": [_png(imgs[0]), _png(imgs[1]), _png(imgs[2])], "instruction": "put the red circle", "qa": json.dumps(qa)},
        {"image": [{"bytes": _png(imgs[0])}, {"bytes": _png(imgs[2])}], "instruction": "a robot"},
    ]
    ex = examples_from_rows(rows)
    assert len(ex[0].refs) == 2 and np.array_equal(ex[0].refs[1], imgs[1]) and np.array_equal(ex[0].target, imgs[2])
    assert len(ex[0].qa) == 1 and list(ex[0].qa[0]) in qa
    assert ex[0].qa == examples_from_rows(rows)[0].qa  # deterministic without a generator
    assert ex[1].qa == [] and np.array_equal(ex[1].target, imgs[2]) and len(ex[1].refs) == 1
    picks = {examples_from_rows(rows[:1], rng=np.random.default_rng(s))[0].qa[0] for s in range(20)}
    assert len(picks) > 1 and all(list(p) in qa for p in picks)
    with pytest.raises(ValueError, match="no images"):
        examples_from_rows([{"image": [], "instruction": "x"}])


def test_collate_pads_references_and_text():
    tok = build_tokenizer(["put", "the", "red", "circle", "is", "there", "a"])
    v = tok.get_vocab()
    examples = [
        Example(refs=[_img(0)], instruction="put the red circle", target=_img(255), qa=[("is there a circle", "yes")]),
        Example(refs=[_img(255), _img(0, size=48), _img(10)], instruction="put zebra the red circle on the beach",
                target=_img(0)),
    ]
    b = collate(examples, tok, CFG)
    assert b["ref_pixels"].shape == (2, 3, 3, 32, 32)
    assert b["ref_mask"].tolist() == [[True, False, False], [True, True, True]]
    assert bool((b["ref_pixels"][0, 0] == -1).all()) and bool((b["ref_pixels"][1, 0] == 1).all())
    assert bool((b["ref_pixels"][0, 1:] == 0).all())  # padding
    assert b["ref_pixels"][1, 1].shape == (3, 32, 32)  # a 48 px reference is resized
    # [BOS] + words, truncated to max_text_len = 6, unknown words -> [UNK]
    assert b["input_ids"][0].tolist() == [v["[BOS]"], v["put"], v["the"], v["red"], v["circle"], v["[PAD]"]]
    assert b["input_ids"][1].tolist() == [v["[BOS]"], v["put"], v["[UNK]"], v["the"], v["red"], v["circle"]]
    assert b["text_mask"].sum(1).tolist() == [5, 6]
    assert b["target_pixels"].shape == (2, 3, 32, 32) and bool((b["target_pixels"][0] == 1).all())
    assert b["qa_answer"].tolist() == [v["yes"], -100]
    assert b["qa_ids"][0, :5].tolist() == [v["[BOS]"], v["is"], v["there"], v["a"], v["circle"]]
    assert torch.equal(b["qa_pixels"], b["target_pixels"])


def test_collate_rejects_bad_input():
    tok = build_tokenizer(["a"])
    with pytest.raises(ValueError, match="max_references"):
        collate([Example(refs=[_img(0)] * 5, instruction="a", target=_img(0))], tok, CFG)
    with pytest.raises(ValueError, match="target"):
        collate([Example(refs=[_img(0)], instruction="a", target=_img(0)), Example(refs=[], instruction="a")], tok, CFG)
    with pytest.raises(ValueError, match="uint8"):
        collate([Example(refs=[np.zeros((32, 32, 3), np.float32)], instruction="a")], tok, CFG)
    inference = collate([Example(refs=[], instruction="a")], tok, CFG)
    assert "target_pixels" not in inference and inference["ref_pixels"].shape == (1, 0, 3, 32, 32)
