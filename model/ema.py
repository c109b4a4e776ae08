"""Exponential moving average of the trained weights, which is what a release ships (BAGEL's `ema.safetensors`).

Each rank keeps the average of exactly the weights it holds: the whole tensor under ZeRO 0-2, its own partition
(`ds_tensor`) under ZeRO-3, so the average costs one extra copy of this rank's share and no communication.
Saving swaps the averages in where the weights live (`swapped_in`), so the ordinary gather-and-write path writes
the averaged release unchanged, whatever the ZeRO stage.

The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates: a short stage (a hundred steps) then
averages over its own later steps instead of being pinned to its initial weights by a decay meant for long runs.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def _held(p: nn.Parameter) -> torch.Tensor:
    """The part of `p` this rank holds: a ZeRO-3 partition, else the whole tensor."""
    shard = getattr(p, "ds_tensor", None)
    return shard if shard is not None else p.data


class WeightEMA:
    def __init__(self, params: list[nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [_held(p).detach().clone().float() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_held(p).float(), 1.0 - d)
        self.updates += 1

    @contextmanager
    def swapped_in(self):
        """The averages in place of the weights (same dtype and place), the weights back afterwards."""
        saved = []
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                held = _held(p)
                saved.append(held.clone())
                held.copy_(s.to(held.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for w, p in zip(saved, self.params):
                    _held(p).copy_(w)

    # resume: each rank writes and reads its own file (its own partitions under ZeRO-3)
    def save(self, path: Path) -> None:
        torch.save({"updates": self.updates, "decay": self.decay, "shadow": self.shadow}, path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if len(state["shadow"]) != len(self.shadow) or any(
                a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError(f"{path}: EMA state does not match this model's trainable weights (another stage or "
                             "ZeRO layout wrote it); delete the stage's work folder to start the stage afresh")
        self.updates = int(state["updates"])
        self.shadow = [t.to(s.device) for t, s in zip(state["shadow"], self.shadow)]
