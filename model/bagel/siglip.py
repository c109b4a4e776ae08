"""SigLIP vision encoder over packed images of different sizes (BAGEL's NaViT variant), its connector to the
language model, and the 2-D sin-cos position tables.

Images arrive already patchified, concatenated along the token axis; `lens` says how many tokens each has.
Attention runs within each image only, so packing never lets two images see each other.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.bagel.config import SiglipConfig


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(c, h, w) -> (h/p * w/p, p * p * c): patches in row-major order, each flattened as (p, q, channel)."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    grid = image.reshape(c, h // patch, patch, w // patch, patch)
    return grid.permute(1, 3, 2, 4, 0).reshape(-1, patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `patchify` for a grid of rows x cols patches."""
    grid = tokens.reshape(rows, cols, patch, patch, channels)
    return grid.permute(4, 0, 2, 1, 3).reshape(channels, rows * patch, cols * patch)


def grid_position_ids(rows: int, cols: int, max_per_side: int, device=None) -> torch.Tensor:
    """Flattened ids row * max_per_side + col: a token keeps its id whatever the image's width (extrapolation)."""
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    return (r * max_per_side + c).flatten()


def _gelu(name: str):
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}")


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        # A Linear over flattened patches equals SigLIP's stride-p convolution, and takes packed tokens directly.
        self.patch_embedding = nn.Linear(cfg.patch_size * cfg.patch_size * cfg.num_channels, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.positions_per_side ** 2, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, lens: list[int]) -> torch.Tensor:
        n, d = x.shape
        shape = (n, self.heads, d // self.heads)
        q, k, v = (proj(x).view(shape).transpose(0, 1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.cat([F.scaled_dot_product_attention(qi, ki, vi)
                         for qi, ki, vi in zip(q.split(lens, 1), k.split(lens, 1), v.split(lens, 1))], dim=1)
        return self.out_proj(out.transpose(0, 1).reshape(n, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _gelu(cfg.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x, lens):
        x = x + self.self_attn(self.layer_norm1(x), lens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.used_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    """`vit_model.*` of the release.

    `activation_checkpointing`: as the language model's, per encoder layer. It only saves memory when the ViT is
    trained (frozen weights on inputs that need no gradient build no graph to recompute).
    """

    activation_checkpointing: bool = False

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """patches: (sum(lens), p*p*3) packed; position_ids index the learned table (row * max_side + col)."""
        vm = self.vision_model
        x = vm.embeddings(patches, position_ids)
        # a frozen ViT on pixels builds no graph: nothing to save, so no per-layer checkpoint bookkeeping either
        recompute = (self.activation_checkpointing and torch.is_grad_enabled()
                     and (patches.requires_grad or any(p.requires_grad for p in self.parameters())))
        for layer in vm.encoder.layers:
            x = checkpoint(layer, x, lens, use_reentrant=False) if recompute else layer(x, lens)
        return vm.post_layernorm(x)


class MLPConnector(nn.Module):
    """ViT width -> language-model width."""

    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.act = _gelu(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def sincos_table_2d(dim: int, side: int) -> np.ndarray:
    """(side*side, dim) 2-D sin-cos table (MAE style), rows of the grid flattened row-major.

    The first half of the channels encodes the column, the second half the row, each as [sin | cos] of
    position * omega; this is the table the release stores, rebuilt for freshly initialised models.
    """
    half = dim // 2
    omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
    cols, rows = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))

    def axis(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([axis(cols), axis(rows)], axis=1).astype(np.float32)


class PositionEmbedding(nn.Module):
    """A frozen 2-D sin-cos table looked up by flattened grid id; stored in the release as `pos_embed`."""

    def __init__(self, max_side: int, dim: int):
        super().__init__()
        self.max_side = max_side
        self.pos_embed = nn.Parameter(torch.zeros(max_side * max_side, dim), requires_grad=False)

    def reset_table(self) -> None:
        """Fill the table for a freshly built model; a loaded release brings its own."""
        table = sincos_table_2d(self.pos_embed.shape[1], self.max_side)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(table))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]
