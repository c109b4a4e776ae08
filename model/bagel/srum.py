"""SRUM's reward-weighted objective (SRUM Sec. 3.3, model.srum_loss) on the BAGEL family's packed forward.

A SRUM batch is `model.bagel.family.collate` of 2B examples: the B self-generated candidates as targets, then
the same B prompts with their ground-truth images as targets. ONE `BagelForTraining.packed_forward` runs over
all 2B samples (guidance dropout, timesteps and noise drawn there as in stage training), and its packed
per-token velocities [2B * N, C] are split back into [2B, N, C]:

    L_r   = over the first B samples, weighted per latent token by the reward map
    L_ref = over the last B samples

Token order: the family packs each target's latent tokens as `BagelModel.latent_to_tokens` patchifies them,
row-major over the (rows, cols) latent grid (token j is row j // cols, column j % cols), and gathers the
velocities back in that order. A reward map [B, rows, cols] flattened row-major therefore lines up token by token.
"""
from __future__ import annotations

import torch
from torch import nn

from model.srum_loss import Weighting, srum_velocity_loss


class BagelSrumLoss(nn.Module):
    """L_r + lambda_c * L_ref as the module DeepSpeed wraps (so ZeRO-3 gathers weights around the whole call).

    `bridge`: a model.config.BridgeConfig to mask reference tokens with, or None. It is passed to the packed
    forward only for batches whose prompts have references: text-to-image prompts leave it nothing to mask.
    """

    def __init__(self, model: nn.Module, *, bridge=None, alpha: float = 1.0, lambda_c: float = 0.5,
                 weighting: Weighting = "direct"):
        super().__init__()
        self.model = model
        self.bridge, self.alpha, self.lambda_c, self.weighting = bridge, alpha, lambda_c, weighting

    def forward(self, batch: dict, reward: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        samples = batch["samples"]
        n, b = len(samples), reward.shape[0]
        if n != 2 * b:
            raise ValueError(f"SRUM batch holds {n} targets for {b} reward maps; expected generated + reference pairs")
        if batch.get("qa"):
            raise ValueError("a SRUM batch carries no question-answer pairs (the understanding loss is not part of it)")
        extra = {}
        if self.bridge is not None and any(s["refs"] for s in samples):
            extra["bridge"] = self.bridge
        out = self.model.packed_forward(batch, generator, **extra)
        v, target = out["velocity"], out["velocity_target"]
        if v.shape[0] % n:
            raise ValueError(f"{v.shape[0]} target tokens do not split into {n} samples of one latent grid")
        v = v.reshape(n, v.shape[0] // n, v.shape[-1])
        target = target.reshape(v.shape)
        losses = srum_velocity_loss(v[:b], target[:b], reward, v[b:], target[b:], alpha=self.alpha,
                                    lambda_c=self.lambda_c, weighting=self.weighting)
        # weight-0 outputs of the modules this batch did not need: every rank calls (and gets gradients for)
        # the same modules, which ZeRO-3 requires
        losses["loss"] = losses["loss"] + out["keepalive"]
        return losses
