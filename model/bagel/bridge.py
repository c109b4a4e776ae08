"""Scone's understanding bridge (Sec. 3.4, Eq. 1-5) on BAGEL's packed layout.

A generation sample is laid out as [per reference: VAE tokens, ViT tokens] [<|im_start|> instruction <|im_end|>]
[target latent tokens], every image framed by its vision markers (model.bagel.packing). At the early layer, the
understanding expert's ViT-token states h^v of each reference and the instruction's states h^t give

    s_i = mean_j cos(h^v_i, h^t_j)                      (Eq. 1-3)
    M_i = 0 if s_i >= tau, -inf otherwise               (Eq. 4, with the released code's >=)
    A~_ki = A_ki + M_i                                  (Eq. 5: logits of target query k to reference key i)

in layers early_layer+1 .. apply_until (inclusive).

What follows the public Scone code (modeling/bagel/qwen2_navit.py, Qwen2Model.forward_train with
use_semantic_mask; data/dataset_base.py) rather than the paper's text:
- "Early-layer states" are the residual stream right after layer `early_layer` (0-based; released: 8), and the
  mask acts from the next layer through `apply_until` inclusive (released: 9..16 of 28).
- The instruction's tokens include its framing <|im_start|> and <|im_end|> (released: packed_instruc_indexes
  holds the shifted text with its bos and the appended eos).
- Kept is s >= tau (released `>=`; the paper's Eq. 4, with `>`, would mask s == tau).
- A reference's VAE (latent) tokens are masked too, by its ViT relevance resized onto its latent grid (bilinear,
  align_corners=False); the i-th reference ViT image pairs with the i-th reference latent image. Vision markers,
  text and the target's own tokens are never masked.
- Only the target's latent tokens (released: the tokens with an MSE loss) are queries that receive the mask;
  its vision markers, the instruction and the references' own queries attend as without the bridge.
- A sample without instruction words (text dropped for guidance: released, no text at all; here an empty framed
  instruction) or without reference ViT tokens gets no mask.
- The released sampler (forward_inference) applies no mask: `BagelModel` applies it only when given a
  BridgeConfig, and a context remembers the mask it was encoded with.
Where this differs: s and the threshold are computed in float32 (released: in the bf16 hidden dtype, whose
spacing near 0.88 is 2^-8, so tokens within ~0.002 of tau may fall on the other side there).

Why the structure holds: references precede the instruction and every segment sees only earlier segments and
itself, so reference states never depend on the instruction (s compares two independent encodings), and no
context token depends on the target, so a cached context's keys/values and mask equal those of one uncached
sequence.

How the layout is read (`layout_of`): the instruction is the sample's text (causal) segments, the last of which
closes the context; images before it are references, latent images after it are targets. No marker is needed, so
every producer of model.bagel.context's layouts gets the bridge. In the plain layout that is one segment after
every reference. In an interleaved one (an instruction with `<imagehere>` placeholders, MIGE) the instruction is
all its framed pieces, and a reference placed after a piece attends to it: there s compares the reference's
states, which have read the text before its placeholder, with the instruction's (Scone's bridge never sees such
contexts; the released data have none).

Straight-through bridge formation (this project's addition for small models): the forward pass
uses the hard mask; target rows additionally get soft_attention - soft_attention.detach() with the differentiable
mask log sigmoid((s - tau) / T) in place of M (q, k, v detached), so values are exactly those of Eq. 4-5 and the
generation loss reaches the understanding states that produce s.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.bagel.packing import PackedSample, SpecialTokens
from model.bagel.qwen2_mot import SoftRows
from model.config import BridgeConfig


@dataclass(frozen=True)
class Reference:
    vit: torch.Tensor  # sample-local positions of its ViT tokens, row-major over vit_grid
    vit_grid: tuple[int, int]
    latent: torch.Tensor | None  # positions of its clean VAE tokens, if the layout has them
    latent_grid: tuple[int, int] | None


@dataclass(frozen=True)
class BridgeLayout:
    instruction: torch.Tensor  # sample-local positions, framing tokens included
    references: tuple[Reference, ...]
    targets: torch.Tensor  # sample-local query rows that receive the mask


def check_layers(cfg: BridgeConfig, num_layers: int) -> None:
    """The bridge settings (params' model.bridge: a release stores none) against the model's depth, which only the
    release knows (llm_config.json's num_hidden_layers)."""
    if not (0 <= cfg.early_layer < cfg.apply_until < num_layers):
        raise ValueError(f"bridge layers model.bridge.early_layer={cfg.early_layer}, model.bridge.apply_until="
                         f"{cfg.apply_until} must satisfy early_layer < apply_until < {num_layers}, the release's "
                         f"number of layers (llm_config.json num_hidden_layers); set model.bridge for this release")


def _index(t: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=torch.long, device="cpu")


def layout_of(sample: PackedSample, special: SpecialTokens) -> BridgeLayout | None:
    """Who is instruction, reference and target in `sample`; None when the bridge has nothing to compare.

    The instruction is every text segment of the context (one in the plain layout; the framed pieces of an
    interleaved one, model.bagel.context), and the last of them closes the context."""
    text = [seg for seg in sample.segments if seg.causal]
    if not text:
        return None
    last = text[-1]
    ids = []
    for seg in text:
        first = bisect.bisect_left(sample.text_index, seg.start)
        ids += sample.text_ids[first: first + (seg.end - seg.start)]
    if all(i in (special.bos, special.eos) for i in ids):
        return None  # instruction dropped: nothing to measure relevance against
    if any(int(im.index[0]) > last.start for im in sample.vit_images):
        raise ValueError("the understanding bridge expects every reference ViT image before the instruction's last "
                         "text segment, which closes the context (a ViT image after it would attend to the "
                         "instruction)")
    vits = sample.vit_images
    if not vits:
        return None
    vaes = [im for im in sample.vae_images if int(im.index[0]) < last.start]
    if vaes and len(vaes) != len(vits):
        raise ValueError(f"{len(vaes)} reference latent images but {len(vits)} reference ViT images: the bridge "
                         "pairs them in order and needs one of each per reference (or no latent ones)")
    refs = tuple(
        Reference(_index(v.index), (v.rows, v.cols),
                  _index(vaes[k].index) if vaes else None, (vaes[k].rows, vaes[k].cols) if vaes else None)
        for k, v in enumerate(vits))
    after = [_index(im.index) for im in sample.vae_images if int(im.index[0]) >= last.end]
    targets = torch.cat(after) if after else torch.zeros(0, dtype=torch.long)
    return BridgeLayout(torch.cat([torch.arange(seg.start, seg.end) for seg in text]), refs, targets)


def relevance(h: torch.Tensor, layout: BridgeLayout) -> list[torch.Tensor]:
    """s of Eq. 3 (float32) for every reference's ViT tokens, from one sample's states h (len, hidden).

    The mean of cosines equals the cosine with the mean of the normalised text states: one product per token."""
    text = F.normalize(h[layout.instruction.to(h.device)].float(), dim=-1).mean(0)
    return [F.normalize(h[r.vit.to(h.device)].float(), dim=-1) @ text for r in layout.references]


def resize(s: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(s.reshape(1, 1, *grid), size=to, mode="bilinear", align_corners=False).reshape(-1)


def key_relevance(s: list[torch.Tensor], layout: BridgeLayout, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s at every key column, which columns are reference tokens) over a sample's n_keys keys."""
    cols, values = [], []
    for ref, si in zip(layout.references, s):
        cols.append(ref.vit)
        values.append(si)
        if ref.latent is not None:
            cols.append(ref.latent)
            values.append(resize(si, ref.vit_grid, ref.latent_grid))
    device = s[0].device
    cols = torch.cat(cols).to(device)
    at = torch.zeros(n_keys, device=device).index_put((cols,), torch.cat(values))
    covered = torch.zeros(n_keys, dtype=torch.bool, device=device)
    covered[cols] = True
    return at, covered


def hard_bias(s: torch.Tensor, covered: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 4 per key: 0 where kept (s >= tau) or not a reference token, -inf where masked."""
    return torch.zeros_like(s).masked_fill(covered & ~(s >= tau), float("-inf"))


def soft_bias(s: torch.Tensor, covered: torch.Tensor, tau: float, temperature: float) -> torch.Tensor:
    """The straight-through surrogate log sigmoid((s - tau) / T) on reference keys, 0 elsewhere."""
    return torch.where(covered, F.logsigmoid((s - tau) / temperature), torch.zeros_like(s))


def _additive(mask: torch.Tensor) -> torch.Tensor:
    # the same 0 / -inf SDPA makes of a boolean mask, so rows without a bias attend exactly as before
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


class BridgeHook:
    """One forward's semantic mask, driven by Qwen2MoTForCausalLM.forward (`before_layer` / `after_layer`).

    Either computed (`from_config`: s from the states after the early layer of this very forward) or fixed
    (`from_contexts`: each cached context's remembered key mask, for its continuation's latent tokens)."""

    def __init__(self, n: int):
        self.layers: list[tuple[int, int] | None] = [None] * n
        self.rows: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * n
        self.key_bias: list[torch.Tensor | None] = [None] * n
        self.soft_key_bias: list[torch.Tensor | None] = [None] * n
        self.relevance: list[list[torch.Tensor] | None] = [None] * n  # detached, per reference, for diagnostics
        self._layouts: list[BridgeLayout | None] = [None] * n
        self._covered: list[torch.Tensor | None] = [None] * n
        self._cfg: BridgeConfig | None = None
        self._straight_through = False
        self._offsets: list[int] = []
        self._lens: list[int] = []
        self._cache: dict[int, torch.Tensor] = {}
        self._soft_cache: dict[int, SoftRows] = {}

    @classmethod
    def from_config(cls, cfg: BridgeConfig, samples: list[PackedSample], special: SpecialTokens, num_layers: int,
                    straight_through: bool = False, only: list[bool] | None = None) -> "BridgeHook":
        """only[i] False: sample i gets no mask whatever its layout."""
        check_layers(cfg, num_layers)
        if any(s.prefix_len for s in samples):
            raise ValueError("the bridge is computed over whole sequences; a continuation of a cached context "
                             "uses the mask its context was encoded with")
        hook = cls(len(samples))
        hook._cfg, hook._straight_through = cfg, straight_through
        hook._lens = [len(s) for s in samples]
        hook._offsets = [sum(hook._lens[:i]) for i in range(len(samples))]
        for i, s in enumerate(samples):
            if only is not None and not only[i]:
                continue
            layout = layout_of(s, special)
            if layout is not None:
                hook._layouts[i] = layout
                hook.rows[i] = layout.targets
                hook.layers[i] = (cfg.early_layer + 1, cfg.apply_until)
        return hook

    @classmethod
    def from_contexts(cls, samples: list[PackedSample], past: list) -> "BridgeHook":
        hook = cls(len(samples))
        for i, (s, ctx) in enumerate(zip(samples, past)):
            if ctx.bridge_bias is None:
                continue
            hook.key_bias[i] = torch.cat([ctx.bridge_bias, ctx.bridge_bias.new_zeros(len(s))])
            hook.layers[i] = ctx.bridge_layers
            lat = [_index(im.index) for im in s.vae_images]
            hook.rows[i] = torch.cat(lat) if lat else torch.zeros(0, dtype=torch.long)
        return hook

    def after_layer(self, n: int, x: torch.Tensor) -> None:
        if self._cfg is None or n != self._cfg.early_layer:
            return
        cfg = self._cfg
        for i, layout in enumerate(self._layouts):
            if layout is None:
                continue
            h = x[self._offsets[i]: self._offsets[i] + self._lens[i]]
            s = relevance(h, layout)
            self.relevance[i] = [si.detach() for si in s]
            at, covered = key_relevance(s, layout, self._lens[i])
            self._covered[i] = covered
            self.key_bias[i] = hard_bias(at.detach(), covered, cfg.tau)
            if self._straight_through:
                self.soft_key_bias[i] = soft_bias(at, covered, cfg.tau, cfg.soft_temperature)

    def _applies(self, i: int, n: int) -> bool:
        span = self.layers[i]
        return (span is not None and self.key_bias[i] is not None and self.rows[i].numel() > 0
                and span[0] <= n <= span[1])

    def before_layer(self, n: int, masks: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[SoftRows | None] | None]:
        todo = [i for i in range(len(masks)) if self._applies(i, n)]
        if not todo:
            return masks, None
        out, soft = list(masks), [None] * len(masks)
        for i in todo:
            rows = self.rows[i].to(masks[i].device)
            if i not in self._cache:  # the same in every masked layer
                m = _additive(masks[i])
                bias = self.key_bias[i].to(m.device)
                m[rows] = m[rows] + bias
                self._cache[i] = m
            out[i] = self._cache[i]
            if self.soft_key_bias[i] is not None:
                if i not in self._soft_cache:
                    base = _additive(masks[i][rows])
                    self._soft_cache[i] = SoftRows(rows, base + self.soft_key_bias[i].to(base.device)[None])
                soft[i] = self._soft_cache[i]
        return out, (soft if any(x is not None for x in soft) else None)

    def context_mask(self, i: int) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
        """What a kept context remembers: its key mask (over prefix + its own tokens) and the layers."""
        if self.key_bias[i] is None:
            return None, None
        return self.key_bias[i].detach(), self.layers[i]

    def kept_fraction(self) -> torch.Tensor | None:
        """Share of reference tokens (ViT and latent) the computed masks keep, as a tensor (no device sync); None
        when no sample here had a mask computed. A diagnostic for choosing tau."""
        pairs = [(b, c) for b, c in zip(self.key_bias, self._covered) if c is not None]
        if not pairs:
            return None
        kept = sum((c & (b == 0)).sum() for b, c in pairs)
        total = sum(c.sum() for _, c in pairs)
        return kept.float() / total.clamp_min(1).float()
