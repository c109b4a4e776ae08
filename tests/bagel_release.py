"""A tiny BAGEL release directory for tests, made the way the chain makes its own (model.bagel.bootstrap): a
byte-level BPE tokenizer on the subject world's words and the judges' questions, the `tiny` preset with fresh
weights, and an autoencoder (fresh, or briefly trained on rendered subject-world images when a test needs
recognisable reconstructions).

`make_release(directory)` builds one; the session fixture `bagel_release` (tests/conftest.py) builds it once per
test session, read-only by convention: a test that writes into a release copies it first (`copy_release`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from model.bagel.autoencoder import FluxAutoencoder
from model.bagel.autoencoder_train import save_autoencoder, train_autoencoder
from model.bagel.bootstrap import assemble_release, judge_texts, train_tokenizer
from model.bagel.config import preset

# Instructions in the templates' words, so the tokenizer learns their merges (the judge questions add the rest).
_EXTRA_TEXTS = [
    "put the red circle from image 1 on the beach", "place the blue square to the left of the green triangle",
    "a striped yellow star in the forest", "the person in red next to the robot in the snow",
]


def render_world_images(directory: Path, n: int, seed: int = 0) -> np.ndarray:
    """About `n` rendered subject-world scenes (uint8, 32 x 32): a small text-to-image dataset built under
    `directory` with the project's own builder, decoded."""
    from data.build import build_dataset
    from data.config import DataConfig, DatasetSizes
    from model.bagel.autoencoder_train import images_from_datasets

    cfg = DataConfig(root=str(directory), seed=seed, num_workers=1, sizes=DatasetSizes(t2i_pretrain=n))
    build_dataset("t2i_pretrain", cfg)
    return images_from_datasets(directory, ["t2i_pretrain"])


def make_release(directory: Path, *, seed: int = 0, train_ae_steps: int = 0, vocab_size: int = 400) -> Path:
    """A tiny release at `directory` (absent or empty). train_ae_steps > 0 trains the autoencoder that long on
    rendered scenes; 0 keeps it fresh (fast; reconstructions are then meaningless)."""
    directory = Path(directory)
    work = directory.parent / f".{directory.name}-parts"
    tokenizer_dir = train_tokenizer(judge_texts() + _EXTRA_TEXTS, work / "tokenizer", vocab_size)
    cfg = preset("tiny").vae
    if train_ae_steps:
        images = render_world_images(work / "data", 64, seed)
        ae, _ = train_autoencoder(images, cfg, steps=train_ae_steps, batch_size=8, lr=2e-3, seed=seed)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ae = FluxAutoencoder(cfg)
    save_autoencoder(ae, ae.config, work / "autoencoder")
    assemble_release(tokenizer_dir, work / "autoencoder", directory, seed=seed)
    shutil.rmtree(work)
    return directory


def copy_release(release: Path, directory: Path) -> Path:
    shutil.copytree(release, directory)
    return directory
