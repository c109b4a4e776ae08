"""The Scone unified model: a BAGEL-like Mixture-of-Transformer-Experts over one packed sequence per sample.

Sequence of a generation sample (two contiguous segments, each handled by its own expert):

    understanding expert: [ [BOS] instruction words | ViT tokens of ref 1 .. ref R ]
    generation expert:    [ latent tokens of ref 1 .. ref R | noisy target latent tokens ]

Every layer: per-expert RMSNorm -> fused q,k,v (+ per-expert q/k RMSNorm) -> ONE attention over the whole
sequence -> per-expert output projection, residual, RMSNorm, SwiGLU MLP, residual.

Attention structure. The context (text, ViT tokens, reference latents) attends bidirectionally to all valid
context tokens and never to the target; target tokens attend to everything valid. So each layer runs two SDPA
calls: context queries over context keys, target queries over context + target keys, with masks that are
per-key vectors broadcast as [B, 1, 1, L_k] (padding, and the understanding bridge for target queries).
Because the context never sees the target, its keys/values and the bridge bias depend on the context alone:
`encode_context` computes them once, `velocity_from_context` runs only the target tokens; sampling reuses
one `ContextCache` for every denoising step. `predict_velocity_dense` is the slow reference: one packed
sequence and a dense [L, L] mask per layer, everything recomputed.

Position and role information: token-type embeddings (text / ViT in the understanding expert, reference
latent / target latent in the generation expert), reference-index embeddings, 1D sin-cos over text positions,
2D sin-cos over each image grid, and a timestep embedding added to the target tokens.

Understanding: a separate pass [ViT tokens of one image | [BOS] question words] through the understanding
expert alone; the LM head reads the final state of the last question token and predicts the one-word answer.

Parameter ownership (the freezing groups of `expert_parameters`):
- understanding: text embeddings, ViT connector (MLP), text/ViT type and reference-index embeddings, the
  `und` half of every layer, final understanding norm, LM head (untied from the text embeddings).
- generation: latent input projection, reference/target type and reference-index embeddings, timestep
  embedding, the `gen` half of every layer, final generation norm, velocity head.
- never trainable: the frozen ViT (`vit`) and the patch "VAE" (`latent`, no parameters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

from model.bridge import semantic_mask, soft_semantic_bias
from model.config import BridgeConfig, ModelConfig
from model.flow import add_noise, flow_matching_loss, sample_timesteps
from model.latent import FrozenViT, PatchLatent

Expert = Literal["understanding", "generation"]
EXPERTS: tuple[Expert, ...] = ("understanding", "generation")


class SconeConfig(PreTrainedConfig):
    """Architecture hyper-parameters saved in config.json (the same names as model.config.ModelConfig)."""

    model_type = "scone"

    vocab_size: int = 64
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    image_size: int = 32
    vit_patch: int = 8
    latent_patch: int = 4
    max_text_len: int = 48
    max_references: int = 4
    timestep_shift: float = 1.0
    timestep_sampling: str = "logit_normal"
    prediction: str = "x0"
    prediction_t_min: float = 0.05
    cfg_drop_text: float = 0.1
    cfg_drop_image: float = 0.05
    bridge_early_layer: int = 1
    bridge_apply_until: int = 2
    bridge_tau: float = 0.88
    bridge_soft_temperature: float = 0.05
    encoder_seed: int = 0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, vocab_size: int) -> "SconeConfig":
        fields = cfg.model_dump(exclude={"name", "bridge"})
        b = cfg.bridge
        return cls(
            vocab_size=vocab_size,
            bridge_early_layer=b.early_layer,
            bridge_apply_until=b.apply_until,
            bridge_tau=b.tau,
            bridge_soft_temperature=b.soft_temperature,
            **fields,
        )

    # Fields that fix parameter shapes or the meaning of the weights: a checkpoint keeps them for life.
    ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "image_size", "vit_patch",
                           "latent_patch", "max_text_len", "max_references", "prediction", "encoder_seed")

    def with_runtime_settings(self, cfg: ModelConfig) -> "SconeConfig":
        """This config with params' non-architectural settings (bridge tau/layers/temperature, guidance dropout,
        timestep sampling) so a stage continuing from a checkpoint follows params.yaml; architecture must match."""
        new = SconeConfig.from_model_config(cfg, self.vocab_size)
        new.encoder_seed = self.encoder_seed
        diff = [f"{f}: checkpoint {getattr(self, f)!r} vs params {getattr(new, f)!r}"
                for f in self.ARCHITECTURE_FIELDS if getattr(self, f) != getattr(new, f)]
        if diff:
            raise ValueError("params.yaml model section does not match the checkpoint's architecture ("
                             + "; ".join(diff) + "): start from scratch or restore the checkpoint's values")
        return new

    def to_model_config(self) -> ModelConfig:
        names = set(ModelConfig.model_fields) - {"name", "bridge"}
        return ModelConfig(
            **{n: getattr(self, n) for n in names},
            bridge=BridgeConfig(early_layer=self.bridge_early_layer, apply_until=self.bridge_apply_until,
                                tau=self.bridge_tau, soft_temperature=self.bridge_soft_temperature),
        )


# ----------------------------------------------------------------------------------------------------------
# position tables (computed, not stored: nothing to load, any device)


@lru_cache(maxsize=32)
def _sincos_1d_cpu(n: int, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]
    table = torch.zeros(n, dim, dtype=torch.float64)
    table[:, 0 : 2 * half : 2], table[:, 1 : 2 * half : 2] = angles.sin(), angles.cos()
    return table.float()


@lru_cache(maxsize=32)
def _sincos_2d_cpu(grid: int, dim: int) -> torch.Tensor:
    """Half of the channels encode the row, half the column (row-major token order)."""
    rows = _sincos_1d_cpu(grid, dim // 2)
    cols = _sincos_1d_cpu(grid, dim - dim // 2)
    return torch.cat([rows.repeat_interleave(grid, 0), cols.repeat(grid, 1)], dim=1)


def sincos_1d(n: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    return _sincos_1d_cpu(n, dim).to(device=like.device, dtype=like.dtype)


def sincos_2d(grid: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    return _sincos_2d_cpu(grid, dim).to(device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------------------------------------
# building blocks


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.down.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ExpertBlock(nn.Module):
    """One expert's weights inside one layer; the attention itself is shared and lives in the caller."""

    def __init__(self, c: SconeConfig):
        super().__init__()
        d, self.heads = c.hidden_size, c.num_heads
        self.head_dim = d // c.num_heads
        self.attn_norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=c.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=c.rms_norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.o_proj.is_residual_out = True
        self.mlp_norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.mlp = SwiGLU(d, int(c.mlp_ratio * d))

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, D] -> q, k, v each [B, H, L, Dh]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual updates after the shared attention; attn [B, H, L, Dh] are this expert's query rows."""
        x = x + self.o_proj(attn.transpose(1, 2).flatten(2))
        return x + self.mlp(self.mlp_norm(x))


class MoTLayer(nn.Module):
    def __init__(self, c: SconeConfig):
        super().__init__()
        self.und = ExpertBlock(c)
        self.gen = ExpertBlock(c)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        emb = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


def _lookup(table: nn.Embedding, index: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Through the module call, never `.weight[...]`: ZeRO-3 gathers a partitioned weight only in its forward.
    return table(torch.as_tensor(index, device=like.device))


class UnderstandingEmbeddings(nn.Module):
    TEXT, VIT = 0, 1

    def __init__(self, c: SconeConfig):
        super().__init__()
        d = c.hidden_size
        self.tokens = nn.Embedding(c.vocab_size, d)
        self.vit_connector = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.kind = nn.Embedding(2, d)
        self.ref_index = nn.Embedding(c.max_references, d)

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + _lookup(self.kind, self.TEXT, ids)
        return x + sincos_1d(ids.shape[1], x.shape[-1], x)

    def vit(self, features: torch.Tensor, grid: int) -> torch.Tensor:
        """features [B, R, Nv, D] from the frozen ViT -> token inputs."""
        x = self.vit_connector(features) + _lookup(self.kind, self.VIT, features)
        refs = _lookup(self.ref_index, torch.arange(features.shape[1]), features)
        return x + refs[:, None, :] + sincos_2d(grid, x.shape[-1], x)


class GenerationEmbeddings(nn.Module):
    REFERENCE, TARGET = 0, 1

    def __init__(self, c: SconeConfig, latent_channels: int):
        super().__init__()
        d = c.hidden_size
        self.latent_in = nn.Linear(latent_channels, d)
        self.kind = nn.Embedding(2, d)
        self.ref_index = nn.Embedding(c.max_references, d)
        self.time = TimestepEmbedding(d)

    def reference(self, latents: torch.Tensor, grid: int) -> torch.Tensor:
        """latents [B, R, Nl, C] (clean) -> token inputs."""
        x = self.latent_in(latents) + _lookup(self.kind, self.REFERENCE, latents)
        refs = _lookup(self.ref_index, torch.arange(latents.shape[1]), latents)
        return x + refs[:, None, :] + sincos_2d(grid, x.shape[-1], x)

    def target(self, x_t: torch.Tensor, t: torch.Tensor, grid: int) -> torch.Tensor:
        x = self.latent_in(x_t) + _lookup(self.kind, self.TARGET, x_t)
        return x + sincos_2d(grid, x.shape[-1], x) + self.time(t)[:, None, :]


@dataclass
class ContextCache:
    """Everything the target tokens need from the context, per layer; valid for any number of denoising steps."""

    keys: list[torch.Tensor]  # [B, H, Lc, Dh]
    values: list[torch.Tensor]
    target_bias: list[torch.Tensor]  # [B, 1, 1, Lc + Lt]: padding (+ bridge) for target queries
    bridge_bias: torch.Tensor | None  # [B, Lc], 0 / -inf, when the bridge is on
    # straight-through training only: per layer, the soft surrogate's key bias for target queries (None where
    # the layer is not masked); see velocity_from_context
    soft_target_bias: list[torch.Tensor | None] | None = None


def _neg_inf_where(invalid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(invalid.shape, dtype=dtype, device=invalid.device).masked_fill(invalid, float("-inf"))


# ----------------------------------------------------------------------------------------------------------


class SconeModel(PreTrainedModel):
    config_class = SconeConfig
    config: SconeConfig
    base_model_prefix = "scone"
    main_input_name = "input_ids"
    input_modalities = ["image", "text"]
    _no_split_modules = ["MoTLayer"]
    _supports_sdpa = True

    def __init__(self, config: SconeConfig):
        super().__init__(config)
        c = config
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} must be divisible by num_heads {c.num_heads}")
        if not (0 <= c.bridge_early_layer < c.bridge_apply_until < c.num_layers):
            raise ValueError(
                f"bridge layers must satisfy 0 <= early_layer ({c.bridge_early_layer}) < apply_until "
                f"({c.bridge_apply_until}) < num_layers ({c.num_layers})"
            )
        self.latent = PatchLatent(c.image_size, c.latent_patch)
        self.vit = FrozenViT(c.image_size, c.vit_patch, c.hidden_size, seed=c.encoder_seed)
        self.und_embed = UnderstandingEmbeddings(c)
        self.gen_embed = GenerationEmbeddings(c, self.latent.channels)
        self.layers = nn.ModuleList(MoTLayer(c) for _ in range(c.num_layers))
        self.und_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.gen_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.velocity_head = nn.Linear(c.hidden_size, self.latent.channels)
        self.lm_head.is_zero_init = self.velocity_head.is_zero_init = True
        self.post_init()
        self.vit.requires_grad_(False)

    # -- construction, weights ---------------------------------------------------------------------------

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, vocab_size: int | None = None) -> "SconeModel":
        """Fresh model for a params.yaml `model:` section; vocab_size defaults to the default tokenizer's."""
        if vocab_size is None:
            from model.tokenizer import build_tokenizer

            vocab_size = len(build_tokenizer())
        return cls(SconeConfig.from_model_config(cfg, vocab_size))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Fan-in scaled projections keep every token family (text, ViT, latents, positions) at unit scale;
        # residual outputs are shrunk with depth; both heads start at zero (DiT-style velocity head).
        if isinstance(module, FrozenViT):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            std = module.in_features ** -0.5
            if getattr(module, "is_residual_out", False):
                std /= math.sqrt(2 * self.config.num_layers)
            if getattr(module, "is_zero_init", False):
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "SconeModel":
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a pair
        model.vit.requires_grad_(False)  # loading may hand back fresh Parameters; the ViT stays frozen
        return loaded

    def expert_modules(self, expert: Expert) -> list[nn.Module]:
        if expert == "understanding":
            return [self.und_embed, self.und_norm, self.lm_head, *(layer.und for layer in self.layers)]
        if expert == "generation":
            return [self.gen_embed, self.gen_norm, self.velocity_head, *(layer.gen for layer in self.layers)]
        raise ValueError(f"unknown expert {expert!r}; use one of {EXPERTS}")

    def expert_parameters(self, expert: Expert) -> list[nn.Parameter]:
        """All parameters of one expert (trainable or not right now); the ViT belongs to neither."""
        return [p for m in self.expert_modules(expert) for p in m.parameters()]

    def set_trainable(self, *, understanding: bool, generation: bool) -> None:
        """Freeze / unfreeze the experts for a stage; the ViT and the latent encoder stay frozen."""
        for expert, on in (("understanding", understanding), ("generation", generation)):
            for p in self.expert_parameters(expert):
                p.requires_grad_(on)
        self.vit.requires_grad_(False)

    # -- geometry ------------------------------------------------------------------------------------------

    @property
    def vit_grid(self) -> int:
        return self.vit.grid

    @property
    def latent_grid(self) -> int:
        return self.latent.grid

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """[..., 3, S, S] in [-1, 1] -> target-latent layout [..., Nl, C] (what predict_velocity works on)."""
        return self.latent.encode(pixels.to(self.dtype))

    def decode_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.latent.decode(tokens)

    # -- context -------------------------------------------------------------------------------------------

    def _embed_context(self, batch: dict[str, torch.Tensor]):
        """Understanding tokens [B, T + R Nv, D], generation context tokens [B, R Nl, D], key validity [B, Lc]."""
        ids, text_mask = batch["input_ids"], batch["text_mask"].bool()
        ref_pixels, ref_mask = batch["ref_pixels"].to(self.dtype), batch["ref_mask"].bool()
        b, r = ref_mask.shape
        flat = ref_pixels.reshape(b * r, *ref_pixels.shape[2:])
        with torch.no_grad():  # frozen encoders: nothing to learn, keep them out of the graph
            vit = self.vit(flat)
        lat = self.latent.encode(flat)
        vit = vit.reshape(b, r, *vit.shape[1:])
        lat = lat.reshape(b, r, *lat.shape[1:])
        xu = torch.cat([self.und_embed.text(ids), self.und_embed.vit(vit, self.vit_grid).flatten(1, 2)], dim=1)
        xg = self.gen_embed.reference(lat, self.latent_grid).flatten(1, 2)
        n_vit, n_lat = self.vit_grid**2, self.latent_grid**2
        valid = torch.cat(
            [text_mask, ref_mask.repeat_interleave(n_vit, dim=1), ref_mask.repeat_interleave(n_lat, dim=1)], dim=1
        )
        return xu, xg, valid

    def _bridge_bias(self, xu: torch.Tensor, batch: dict[str, torch.Tensor], *, soft: bool = False) -> torch.Tensor:
        """Semantic mask from the understanding states after layer early_layer, laid out over context keys.

        soft=True gives the differentiable surrogate of the straight-through estimator instead of Eq. 4."""
        text_mask, ref_mask = batch["text_mask"].bool(), batch["ref_mask"].bool()
        b, t = text_mask.shape
        r = ref_mask.shape[1]
        instruction = text_mask.clone()
        instruction[:, 0] = False  # [BOS] is no instruction word
        args = (
            xu[:, t:].reshape(b, r, self.vit_grid**2, xu.shape[-1]),
            xu[:, :t],
            instruction,
            ref_mask,
            self.vit_grid,
            self.latent_grid,
            self.config.bridge_tau,
        )
        if soft:
            vit_bias, lat_bias = soft_semantic_bias(*args, temperature=self.config.bridge_soft_temperature)
        else:
            vit_bias, lat_bias = semantic_mask(*args)
        return torch.cat([vit_bias.new_zeros(b, t), vit_bias.flatten(1), lat_bias.flatten(1)], dim=1)

    def _bridge_layers(self, bridge: bool) -> range:
        c = self.config
        return range(c.bridge_early_layer + 1, c.bridge_apply_until + 1) if bridge else range(0)

    def encode_context(
        self, batch: dict[str, torch.Tensor], *, bridge: bool, straight_through: bool = False
    ) -> ContextCache:
        """Run the context through every layer once: per-layer keys/values and the target queries' key bias.

        straight_through (training, bridge on): also keep the soft surrogate of the mask, so the generation
        loss reaches the understanding states that produce s (values stay those of the hard mask)."""
        xu, xg, valid = self._embed_context(batch)
        n_u = xu.shape[1]
        pad = _neg_inf_where(~valid, xu.dtype)
        ctx_mask = pad[:, None, None, :]
        n_target = self.latent_grid**2
        target_pad = torch.cat([pad, pad.new_zeros(pad.shape[0], n_target)], dim=1)
        keys, values, bridge_bias, soft_bias = [], [], None, None
        masked_layers = self._bridge_layers(bridge)
        for i, layer in enumerate(self.layers):
            qu, ku, vu = layer.und.qkv_heads(xu)
            qg, kg, vg = layer.gen.qkv_heads(xg)
            k, v = torch.cat([ku, kg], dim=2), torch.cat([vu, vg], dim=2)
            attn = F.scaled_dot_product_attention(torch.cat([qu, qg], dim=2), k, v, attn_mask=ctx_mask)
            xu = layer.und.finish(xu, attn[:, :, :n_u])
            xg = layer.gen.finish(xg, attn[:, :, n_u:])
            keys.append(k)
            values.append(v)
            if bridge and i == self.config.bridge_early_layer:
                bridge_bias = self._bridge_bias(xu, batch)
                if straight_through:
                    soft_bias = self._bridge_bias(xu, batch, soft=True)
        target_bias = []
        for i in range(len(self.layers)):
            bias = target_pad
            if i in masked_layers:
                bias = bias + F.pad(bridge_bias.to(bias.dtype), (0, n_target))
            target_bias.append(bias[:, None, None, :])
        soft_target_bias = None
        if soft_bias is not None:
            soft_target_bias = [
                (target_pad + F.pad(soft_bias.to(target_pad.dtype), (0, n_target)))[:, None, None, :]
                if i in masked_layers else None
                for i in range(len(self.layers))
            ]
        return ContextCache(keys, values, target_bias, bridge_bias, soft_target_bias)

    def velocity_from_context(self, ctx: ContextCache, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity for target latents x_t [B, Nl, C] at times t [B]; only the target tokens are computed."""
        if x_t.shape[1] != self.latent_grid**2:
            raise ValueError(f"x_t has {x_t.shape[1]} tokens, the target grid has {self.latent_grid**2}")
        x = self.gen_embed.target(x_t.to(self.dtype), t, self.latent_grid)
        soft_biases = ctx.soft_target_bias or [None] * len(self.layers)
        for layer, k_ctx, v_ctx, bias, soft in zip(self.layers, ctx.keys, ctx.values, ctx.target_bias, soft_biases):
            q, k, v = layer.gen.qkv_heads(x)
            k, v = torch.cat([k_ctx, k], dim=2), torch.cat([v_ctx, v], dim=2)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
            if soft is not None:
                # Straight-through: value = hard-masked attention (soft - soft is exactly 0); gradient w.r.t. the
                # bridge = that of the soft mask. q, k, v are detached so they get their gradient once, from the
                # hard path, and the extra term only trains what produces s.
                qd, kd, vd = q.detach(), k.detach(), v.detach()
                soft_attn = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=soft.to(q.dtype))
                attn = attn + (soft_attn - soft_attn.detach())
            x = layer.gen.finish(x, attn)
        return self._as_velocity(self.velocity_head(self.gen_norm(x)), x_t, t)

    def _as_velocity(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The head's output as a velocity. With x0-prediction the network only has to produce a clean image
        (low-dimensional), not to carry the noise through: v = (x_t - x0_hat) / t, t clamped away from 0."""
        if self.config.prediction == "velocity":
            return out
        t = t.to(out.dtype).clamp_min(self.config.prediction_t_min)[:, None, None]
        return (x_t.to(out.dtype) - out) / t

    def predict_velocity(
        self, batch: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, *, bridge: bool,
        straight_through: bool = False,
    ) -> torch.Tensor:
        """v(x_t, t | references, instruction) for target latents x_t [B, Nl, C] (see encode_latents)."""
        ctx = self.encode_context(batch, bridge=bridge, straight_through=straight_through)
        return self.velocity_from_context(ctx, x_t, t)

    def predict_velocity_dense(
        self, batch: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, *, bridge: bool
    ) -> torch.Tensor:
        """Reference implementation: one packed sequence per sample and a dense [L, L] mask in every layer.

        Slow (recomputes the context every call); the sampler's uncached path and the tests use it to check
        the two-call attention and the context cache."""
        xu, xg, valid = self._embed_context(batch)
        xt = self.gen_embed.target(x_t.to(self.dtype), t, self.latent_grid)
        n_u, n_ctx, n_t = xu.shape[1], valid.shape[1], xt.shape[1]
        xgen = torch.cat([xg, xt], dim=1)
        b = valid.shape[0]
        # keys: context keys valid per padding; target keys always valid
        key_bias = _neg_inf_where(~torch.cat([valid, valid.new_ones(b, n_t)], dim=1), xu.dtype)
        rows_ctx = key_bias[:, None, :].expand(b, n_ctx, -1).clone()
        rows_ctx[:, :, n_ctx:] = float("-inf")  # the context never sees the target
        rows_tgt = key_bias[:, None, :].expand(b, n_t, -1)
        base = torch.cat([rows_ctx, rows_tgt], dim=1)
        mask = base
        masked_layers = self._bridge_layers(bridge)
        for i, layer in enumerate(self.layers):
            qu, ku, vu = layer.und.qkv_heads(xu)
            qg, kg, vg = layer.gen.qkv_heads(xgen)
            q, k, v = (torch.cat(pair, dim=2) for pair in ((qu, qg), (ku, kg), (vu, vg)))
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None].to(q.dtype))
            xu = layer.und.finish(xu, attn[:, :, :n_u])
            xgen = layer.gen.finish(xgen, attn[:, :, n_u:])
            if bridge and i == self.config.bridge_early_layer:
                bridge_rows = F.pad(self._bridge_bias(xu, batch), (0, n_t))[:, None, :].expand(b, n_t, -1)
                bridged = torch.cat([rows_ctx, rows_tgt + bridge_rows.to(rows_tgt.dtype)], dim=1)
            mask = bridged if (i + 1) in masked_layers else base
        return self._as_velocity(self.velocity_head(self.gen_norm(xgen[:, -n_t:])), x_t, t)

    # -- understanding -------------------------------------------------------------------------------------

    def answer_logits(self, pixels: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the answer to a question about an image: [B, 3, S, S], [B, Tq], [B, Tq] -> [B, V].

        Sequence [ViT tokens | [BOS] question]; the last valid question token's final state is read out."""
        question_mask = question_mask.bool()
        with torch.no_grad():
            feats = self.vit(pixels.to(self.dtype))
        x = torch.cat([self.und_embed.vit(feats[:, None], self.vit_grid)[:, 0], self.und_embed.text(question_ids)], 1)
        n_vit = feats.shape[1]
        valid = torch.cat([question_mask.new_ones(question_mask.shape[0], n_vit), question_mask], dim=1)
        mask = _neg_inf_where(~valid, x.dtype)[:, None, None, :]
        for layer in self.layers:
            q, k, v = layer.und.qkv_heads(x)
            x = layer.und.finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        last = n_vit + question_mask.sum(1) - 1
        return self.lm_head(self.und_norm(x[torch.arange(x.shape[0], device=x.device), last]))

    # -- training ------------------------------------------------------------------------------------------

    def drop_conditions(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        """Classifier-free-guidance dropout with fixed shapes (masks only).

        One uniform draw per sample: references are dropped when u < cfg_drop_image, the instruction when
        u < max(cfg_drop_text, cfg_drop_image). Dropping the references therefore always drops the text too,
        which gives the sampler's three conditions (full, references only, nothing) and never text without
        references. A dropped instruction leaves [BOS] alone."""
        c = self.config
        text_mask, ref_mask = batch["text_mask"].bool(), batch["ref_mask"].bool()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(text_mask.shape[0], generator=generator, device=gen_device).to(text_mask.device)
        drop_image = u < c.cfg_drop_image
        drop_text = u < max(c.cfg_drop_text, c.cfg_drop_image)
        words = torch.arange(text_mask.shape[1], device=text_mask.device) > 0
        return {
            **batch,
            "text_mask": text_mask & ~(drop_text[:, None] & words[None]),
            "ref_mask": ref_mask & ~drop_image[:, None],
        }

    def training_loss(
        self,
        batch: dict[str, torch.Tensor],
        *,
        bridge: bool,
        und_loss_weight: float = 0.1,
        bridge_straight_through: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """loss = flow-matching MSE on the target latents + und_loss_weight * answer cross-entropy (when the
        batch carries questions). Conditions are dropped for guidance only in train() mode.

        bridge_straight_through (with bridge): gradient of the loss through the semantic mask via its soft
        surrogate (bridge formation, model.bridge); the loss value is unchanged."""
        if "target_pixels" not in batch:
            raise KeyError("training_loss needs batch['target_pixels']: collate examples that have a target image")
        x0 = self.encode_latents(batch["target_pixels"])
        b = x0.shape[0]
        c = self.config
        t = sample_timesteps(b, shift=c.timestep_shift, mode=c.timestep_sampling, generator=generator, device=x0.device)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device, x0.dtype)
        cond = self.drop_conditions(batch, generator) if self.training else batch
        v = self.predict_velocity(cond, add_noise(x0, noise, t), t, bridge=bridge,
                                  straight_through=bridge and bridge_straight_through)
        fm_loss = flow_matching_loss(v, x0, noise)
        und_loss = fm_loss.new_zeros(())
        answers = batch.get("qa_answer")
        if answers is not None and bool((answers >= 0).any()):
            logits = self.answer_logits(batch["qa_pixels"], batch["qa_ids"], batch["qa_mask"])
            und_loss = F.cross_entropy(logits.float(), answers.long(), ignore_index=-100)
        return {"loss": fm_loss + und_loss_weight * und_loss, "fm_loss": fm_loss, "und_loss": und_loss}

    def forward(
        self,
        bridge: bool = False,
        und_loss_weight: float = 0.1,
        bridge_straight_through: bool = False,
        generator: torch.Generator | None = None,
        **batch: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """`model(**batch, bridge=...)` is `training_loss` (so DeepSpeed's engine hooks see a forward call)."""
        return self.training_loss(batch, bridge=bridge, und_loss_weight=und_loss_weight,
                                  bridge_straight_through=bridge_straight_through, generator=generator)


# ----------------------------------------------------------------------------------------------------------
# checkpoint IO: model.safetensors + config.json + tokenizer files in one directory


def save_checkpoint(model: SconeModel, tokenizer, directory: str | Path) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) from a directory written by save_checkpoint."""
    from model.tokenizer import load_tokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is no Scone checkpoint (config.json missing)")
    model = SconeModel.from_pretrained(str(directory)).to(device).eval()
    return model, load_tokenizer(directory)
