"""The frozen image encoders of the tiny scale: a patchify "VAE" and a random-feature "ViT".

The paper keeps BAGEL's ViT and VAE frozen in every stage. At the tiny scale they are stand-ins with the same
roles and shapes:
- `PatchLatent`: exactly invertible patchify. uint8 image -> [-1, 1] -> tokens [B, (S/p)^2, 3 p^2]; decode inverts
  (encode -> decode of a uint8 image gives back the same bytes). No parameters.
- `FrozenViT`: a fixed random patch encoder (linear patch embedding, GELU, linear, LayerNorm without affine)
  giving [B, (S/vp)^2, hidden]. Its weights come from a fixed seed, are saved with the checkpoint like any
  weight and never receive gradients.

Token order everywhere is row-major over the patch grid; the channel order inside a latent token is
(colour, row in patch, column in patch).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    x = torch.tensor(images) if isinstance(images, np.ndarray) else images  # copy: numpy views may be read-only
    if x.dtype != torch.uint8 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images shaped [..., H, W, 3], got {tuple(x.shape)} {x.dtype}")
    return x.movedim(-1, -3).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 numpy [..., H, W, 3] (clipped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)(W/p), C p p]."""
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by patch {patch}")
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for square images of side `size`."""
    n, _, _ = tokens.shape
    g = size // patch
    x = tokens.reshape(n, g, g, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, size, size)


class PatchLatent(nn.Module):
    """Frozen, exactly invertible "autoencoder": latent tokens are pixel patches in [-1, 1]."""

    def __init__(self, image_size: int, patch: int):
        super().__init__()
        self.image_size, self.patch = image_size, patch
        self.grid = image_size // patch
        self.channels = 3 * patch * patch

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[..., 3, S, S] in [-1, 1] -> [..., grid^2, 3 p^2]."""
        lead = pixels.shape[:-3]
        tokens = patchify(pixels.reshape(-1, *pixels.shape[-3:]), self.patch)
        return tokens.reshape(*lead, *tokens.shape[1:])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        lead = tokens.shape[:-2]
        x = unpatchify(tokens.reshape(-1, *tokens.shape[-2:]), self.patch, self.image_size)
        return x.reshape(*lead, *x.shape[1:])


class FrozenViT(nn.Module):
    """Fixed random patch encoder standing in for BAGEL's SigLIP ViT (never trained)."""

    def __init__(self, image_size: int, patch: int, hidden_size: int, seed: int):
        super().__init__()
        self.image_size, self.patch, self.seed = image_size, patch, seed
        self.grid = image_size // patch
        fan_in = 3 * patch * patch
        self.patch_weight = nn.Parameter(torch.empty(hidden_size, fan_in), requires_grad=False)
        self.patch_bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.mix_weight = nn.Parameter(torch.empty(hidden_size, hidden_size), requires_grad=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Own generator: the features depend on the seed only, not on the global RNG or module order.
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        for p, std in ((self.patch_weight, self.patch_weight.shape[1] ** -0.5), (self.patch_bias, 0.5),
                       (self.mix_weight, self.mix_weight.shape[1] ** -0.5)):
            if p.device.type == "meta":
                continue
            init.copy_(p, torch.randn(p.shape, generator=g) * std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [-1, 1] -> [N, grid^2, hidden]."""
        x = patchify(pixels.to(self.patch_weight.dtype), self.patch)
        x = F.gelu(F.linear(x, self.patch_weight, self.patch_bias))
        x = F.linear(x, self.mix_weight)
        return F.layer_norm(x, x.shape[-1:])
