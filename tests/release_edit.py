"""Copies of a test release (tests/bagel_release.py) with some of its weights changed, written back into the
release's own weights files, so the copy loads through the same strict path as a stage's checkpoint."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.bagel.release import find_weights

Edit = Callable[[torch.Tensor], torch.Tensor]


def copy_with_weights(release: Path, directory: Path, edits: Mapping[str, Edit]) -> Path:
    """Copy `release` to `directory` and replace each tensor named in `edits` by `edit(tensor)` (same shape and
    dtype); a name the weights do not hold is an error, so a renamed key fails the test instead of passing it."""
    shutil.copytree(release, directory)
    todo = dict(edits)
    for path in find_weights(directory).files:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        state = load_file(str(path))
        hit = [k for k in todo if k in state]
        for key in hit:
            new = todo.pop(key)(state[key].clone())
            if new.shape != state[key].shape:
                raise ValueError(f"{key}: edit changed the shape {tuple(state[key].shape)} -> {tuple(new.shape)}")
            state[key] = new.to(state[key].dtype).contiguous()
        if hit:
            save_file(state, str(path), metadata=metadata)
    if todo:
        raise KeyError(f"{release} has no weights named {sorted(todo)}")
    return Path(directory)


def random_normal(std: float, seed: int) -> Edit:
    """An edit drawing the tensor afresh from N(0, std^2), reproducibly."""
    def edit(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * std

    return edit


def zeros(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t)


# BAGEL starts the velocity head at zero (model.bagel.model.init_fresh): a fresh release samples pure noise through
# the autoencoder whatever it is asked. A random head makes what it generates depend on the model's forward.
VELOCITY_HEAD = "llm2vae.weight"
# The understanding expert's output layer: all zero, every answer token has the same logit, so P(yes) = 0.5 for
# every question, the "no evidence either way" model the judges' calibration is defined against.
LM_HEAD = "language_model.lm_head.weight"
