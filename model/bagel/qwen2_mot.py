"""Qwen2 decoder as a Mixture of Transformer Experts (BAGEL's MoT).

Every layer holds two full copies of its weights: the understanding expert (text, image markers, ViT tokens) and
the generation expert (`*_moe_gen`: VAE latent tokens). Both experts read and write one shared self-attention
over the packed sequence, so a latent token attends to text and vice versa; only the projections, QK-norms,
layer norms and MLPs are chosen per token. Parameter names follow the release's keys exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.bagel.config import Qwen2Config

GEN_SUFFIX = "_moe_gen"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the storage dtype, as Qwen2 does, so bf16 runs match fp32 closely.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """Qwen2 RoPE (half-split rotation). Positions are explicit: an image shares one position for all its tokens."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # Not persistent: derived from the config, and absent from the release's weights.
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** steps)

    def reset_buffers(self, device) -> None:
        """Recompute after building on the meta device (`to_empty` leaves buffers uninitialised)."""
        self.inv_freq = self._inv_freq(device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Routing:
    """Which packed tokens go to which expert; indexes computed once per forward and reused by every layer."""

    def __init__(self, gen_mask: torch.Tensor):
        self.gen_mask = gen_mask
        self.gen = gen_mask.nonzero(as_tuple=True)[0]
        self.und = (~gen_mask).nonzero(as_tuple=True)[0]

    def apply(self, x: torch.Tensor, und_fn, gen_fn, out_dim: int | None = None) -> torch.Tensor:
        """Run `und_fn` on understanding tokens and `gen_fn` on generation tokens, scattered back in order."""
        out = x.new_empty(x.shape[0], *(x.shape[1:-1]), out_dim or x.shape[-1])
        if self.und.numel():
            out[self.und] = und_fn(x[self.und])
        if self.gen.numel():
            out[self.gen] = gen_fn(x[self.gen])
        return out


@dataclass
class LayerKV:
    """Keys (after norm and rotation) and values of one sample's prefix at one layer; (tokens, kv_heads, dim)."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass
class SoftRows:
    """Query rows of one sample and their differentiable additive mask (rows, past + q) for straight-through."""

    rows: torch.Tensor
    mask: torch.Tensor


def _straight_through(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      soft: SoftRows) -> torch.Tensor:
    """out (heads, q, dim) plus (a - a.detach()) on soft.rows, a = attention of those rows under soft.mask.

    q, k and v are detached: they already get their gradient from the exact (hard-masked) attention, so the extra
    term only trains what produced the mask."""
    rows = soft.rows.to(out.device)
    qr = q[:, rows].detach()
    a = F.scaled_dot_product_attention(qr, k.detach(), v.detach(), attn_mask=soft.mask.to(qr.dtype))
    return out.index_add(1, rows, a - a.detach())


class MoTAttention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for suffix in ("", GEN_SUFFIX):
            setattr(self, f"q_proj{suffix}", nn.Linear(cfg.hidden_size, q_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, cfg.hidden_size, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(self.head_dim, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(self.head_dim, cfg.rms_norm_eps))

    def _qkv(self, x: torch.Tensor, suffix: str) -> torch.Tensor:
        q = getattr(self, f"q_proj{suffix}")(x).view(-1, self.num_heads, self.head_dim)
        k = getattr(self, f"k_proj{suffix}")(x).view(-1, self.num_kv_heads, self.head_dim)
        v = getattr(self, f"v_proj{suffix}")(x).view(-1, self.num_kv_heads, self.head_dim)
        q = getattr(self, f"q_norm{suffix}")(q)
        k = getattr(self, f"k_norm{suffix}")(k)
        # One tensor so Routing can scatter the three at once.
        return torch.cat([q, k, v], dim=1)

    def forward(self, x: torch.Tensor, routing: Routing, rope: tuple[torch.Tensor, torch.Tensor],
                masks: list[torch.Tensor], sample_lens: list[int],
                past: list[LayerKV] | None = None, keep: list[LayerKV] | None = None,
                soft: list[SoftRows | None] | None = None) -> torch.Tensor:
        """x: packed (tokens, hidden). masks[i]: bool (q_i, past_i + q_i), True where attention is allowed, or
        an additive float mask of that shape (0 / -inf, the understanding bridge's layers).

        With `past`, sample i's queries also see its cached prefix; with `keep`, each sample's full keys/values
        (prefix + new) are appended there, ready to serve as the next call's `past`. `soft[i]` (straight-through
        bridge training) adds to the rows it names a term whose value is exactly zero and whose gradient is that of
        attention under its differentiable mask.
        """
        heads = self.num_heads + 2 * self.num_kv_heads
        qkv = routing.apply(x, lambda t: self._qkv(t, "").flatten(1), lambda t: self._qkv(t, GEN_SUFFIX).flatten(1),
                            out_dim=heads * self.head_dim).view(-1, heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        cos, sin = rope
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)

        groups = self.num_heads // self.num_kv_heads
        outputs = []
        for i, (qi, ki, vi) in enumerate(zip(q.split(sample_lens), k.split(sample_lens), v.split(sample_lens))):
            if past is not None:
                ki = torch.cat([past[i].key, ki])
                vi = torch.cat([past[i].value, vi])
            if keep is not None:
                keep.append(LayerKV(ki, vi))
            # Query head h reads key/value head h // groups (Qwen2's GQA grouping).
            kh = ki.repeat_interleave(groups, dim=1).transpose(0, 1)
            vh = vi.repeat_interleave(groups, dim=1).transpose(0, 1)
            mask = masks[i]
            if mask.is_floating_point() and mask.dtype != qi.dtype:
                mask = mask.to(qi.dtype)  # SDPA wants an additive mask in the query's dtype
            out = F.scaled_dot_product_attention(qi.transpose(0, 1), kh, vh, attn_mask=mask)
            if soft is not None and soft[i] is not None:
                out = _straight_through(out, qi.transpose(0, 1), kh, vh, soft[i])
            outputs.append(out.transpose(0, 1).reshape(qi.shape[0], -1))
        attn = torch.cat(outputs)
        return routing.apply(attn, self.o_proj, getattr(self, f"o_proj{GEN_SUFFIX}"), out_dim=x.shape[-1])


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, routing: Routing, rope, masks, sample_lens, past=None, keep=None, soft=None):
        h = routing.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, routing, rope, masks, sample_lens, past, keep, soft)
        ffn = routing.apply(x, lambda t: self.mlp(self.post_attention_layernorm(t)),
                            lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return x + ffn


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class Qwen2MoTForCausalLM(nn.Module):
    """`language_model.*` of the release: the MoT decoder (`model`) and an untied `lm_head`.

    `activation_checkpointing` (off by default; the stage trainer's train.activation_checkpointing turns it on): in
    a forward that builds a graph, each decoder layer keeps only its input and runs again in backward (torch's
    non-reentrant checkpoint), so activation memory is one layer's plus the residual stream per layer.
    """

    activation_checkpointing: bool = False

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, gen_mask: torch.Tensor, position_ids: torch.Tensor,
                masks: list[torch.Tensor], sample_lens: list[int],
                past: list[list[LayerKV]] | None = None,
                keep: bool = False, bridge=None) -> tuple[torch.Tensor, list[list[LayerKV]] | None]:
        """Final hidden states (after each expert's final norm) of packed embeddings `x`.

        past[layer][sample] is a cached prefix per sample; with keep=True the new cache (prefix + these tokens)
        is returned in the same layout. `bridge` (model.bagel.bridge.BridgeHook) sees the residual stream after
        every layer and may replace a layer's masks; it calls no module, so every rank of a ZeRO-3 step still
        calls the same modules in the same order.
        """
        routing = Routing(gen_mask)
        rope = self.model.rotary_emb(position_ids)
        kept: list[list[LayerKV]] | None = [] if keep else None
        # A recomputed layer would append its cache a second time, and without a graph there is nothing to save.
        recompute = self.activation_checkpointing and not keep and torch.is_grad_enabled()
        for n, layer in enumerate(self.model.layers):
            layer_keep: list[LayerKV] | None = [] if keep else None
            layer_masks, soft = (masks, None) if bridge is None else bridge.before_layer(n, masks)
            layer_past = None if past is None else past[n]
            if recompute:
                x = checkpoint(layer, x, routing, rope, layer_masks, sample_lens, layer_past, None, soft,
                               use_reentrant=False)
            else:
                x = layer(x, routing, rope, layer_masks, sample_lens, layer_past, layer_keep, soft)
            if bridge is not None:
                bridge.after_layer(n, x)
            if keep:
                kept.append(layer_keep)
        x = routing.apply(x, self.model.norm, self.model.norm_moe_gen)
        return x, kept
