"""The understanding bridge's semantic mask (Scone Sec. 3.4, Eq. 1-5).

For every reference image r of a sample, with h^v its understanding-expert ViT-token states and h^t the
states of the instruction tokens, both taken at the early layer:

    Eq. 1  L2-normalise every state
    Eq. 2  S_ij = <h^v_i, h^t_j>                      (cosine matrix)
    Eq. 3  s_i  = mean_j S_ij                         (relevance of ViT token i)
    Eq. 4  M_i  = 0 if s_i > tau, -inf otherwise      (the paper's rule: s_i == tau is masked)
    Eq. 5  A~_ki = A_ki + M_i                         (logits of target query k to key i, later layers)

Conventions of this implementation:
- "Early-layer states" are the understanding-expert residual stream after layer `early_layer` (0-based), i.e.
  the input of layer `early_layer + 1`; the mask acts in layers early_layer+1 .. apply_until (inclusive).
- Instruction tokens are the valid word tokens of the instruction ([BOS] and padding excluded). Eq. 3 averages
  cosines, which equals the cosine of each ViT state with the mean of the normalised text states; that is how
  it is computed (one matrix-vector product per sample instead of the N_v x N_t matrix).
- The latent grid (generation expert's tokens of the same reference) has its own resolution: s is resized
  from the reference's ViT grid to its latent grid by bilinear interpolation (align_corners=False), then
  thresholded. ViT keys use s on the ViT grid, latent keys the resized s.
- No mask (bias 0) for padded references (their keys are removed by the padding mask anyway) and for samples
  without instruction tokens (the instruction dropped for classifier-free guidance): there is nothing to
  compare with, so the bridge stays open.
- Only target query rows receive the bias. A target row whose every reference token is masked still sees the
  text tokens and all target tokens, which are never masked, so its softmax is always defined.

Straight-through bridge formation (our addition for small, scratch-trained models; the forward pass stays Eq. 4).
The hard mask passes no gradient to s, and a key at -inf gets zero attention and hence zero gradient, so the
understanding expert cannot learn from the generation loss which reference tokens help. `soft_semantic_bias`
gives the surrogate log sigmoid((s - tau) / T) with the same layout and conventions; the model adds
(soft attention - its detached copy) to the hard-masked attention output, so values are exactly those of Eq. 4-5
while d loss / d s is that of the soft mask (see modeling.SconeModel.velocity_from_context).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Grid = int | tuple[int, int]


def _hw(grid: Grid) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def semantic_relevance(vit_states: torch.Tensor, text_states: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """s of Eq. 3 for every ViT token: vit_states [B, R, Nv, D], text_states [B, T, D], text_valid [B, T] -> [B, R, Nv].

    Samples without a valid text token get s = 0 (callers decide what that means)."""
    v = F.normalize(vit_states.float(), dim=-1)
    t = F.normalize(text_states.float(), dim=-1)
    w = text_valid.to(t.dtype)
    t_mean = (t * w.unsqueeze(-1)).sum(1) / w.sum(1).clamp_min(1.0).unsqueeze(-1)
    return torch.einsum("brnd,bd->brn", v, t_mean)


def resize_relevance(s: torch.Tensor, vit_grid: Grid, latent_grid: Grid) -> torch.Tensor:
    """[B, R, gh*gw] on the ViT grid -> [B, R, lh*lw] on the latent grid (bilinear, align_corners=False)."""
    b, r, n = s.shape
    (gh, gw), (lh, lw) = _hw(vit_grid), _hw(latent_grid)
    if n != gh * gw:
        raise ValueError(f"{n} ViT tokens per reference do not form a {gh}x{gw} grid")
    img = s.reshape(b * r, 1, gh, gw)
    return F.interpolate(img, size=(lh, lw), mode="bilinear", align_corners=False).reshape(b, r, lh * lw)


def _bridge_applies(text_valid: torch.Tensor, ref_valid: torch.Tensor) -> torch.Tensor:
    """[B, R, 1]: valid references of samples that have instruction words (the others stay open)."""
    return (ref_valid & text_valid.any(1, keepdim=True)).unsqueeze(-1)


def semantic_mask(
    vit_states: torch.Tensor,
    text_states: torch.Tensor,
    text_valid: torch.Tensor,
    ref_valid: torch.Tensor,
    vit_grid: Grid,
    latent_grid: Grid,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-4 for a padded batch: additive key biases (0 or -inf, float32) for target queries.

    vit_states [B, R, Nv, D], text_states [B, T, D], text_valid [B, T] bool (instruction words only),
    ref_valid [B, R] bool -> (vit_key_bias [B, R, Nv], latent_key_bias [B, R, Nl]).
    """
    s_vit = semantic_relevance(vit_states, text_states, text_valid)
    s_lat = resize_relevance(s_vit, vit_grid, latent_grid)
    applies = _bridge_applies(text_valid, ref_valid)
    neg_inf = torch.tensor(float("-inf"), device=s_vit.device)
    zero = torch.zeros((), device=s_vit.device)

    def bias(s: torch.Tensor) -> torch.Tensor:
        return torch.where(applies & ~(s > tau), neg_inf, zero)

    return bias(s_vit), bias(s_lat)


def soft_semantic_bias(
    vit_states: torch.Tensor,
    text_states: torch.Tensor,
    text_valid: torch.Tensor,
    ref_valid: torch.Tensor,
    vit_grid: Grid,
    latent_grid: Grid,
    tau: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable surrogate of `semantic_mask`: log sigmoid((s - tau) / temperature), same shapes and layout.

    As temperature -> 0 it tends to the hard mask (0 above tau, -inf below). Log-sigmoid is linear far below
    tau, so a fully masked reference still gets a gradient of 1 / temperature per unit of s (no saturation)."""
    if temperature <= 0:
        raise ValueError(f"bridge soft temperature must be > 0, got {temperature}")
    s_vit = semantic_relevance(vit_states, text_states, text_valid)
    s_lat = resize_relevance(s_vit, vit_grid, latent_grid)
    applies = _bridge_applies(text_valid, ref_valid)

    def bias(s: torch.Tensor) -> torch.Tensor:
        return torch.where(applies, F.logsigmoid((s - tau) / temperature), torch.zeros((), device=s.device))

    return bias(s_vit), bias(s_lat)


def kept_fraction(vit_key_bias: torch.Tensor, ref_valid: torch.Tensor) -> float:
    """Share of valid references' ViT tokens the mask leaves visible (a diagnostic for choosing tau)."""
    valid = ref_valid.unsqueeze(-1).expand_as(vit_key_bias)
    if not valid.any():
        return 1.0
    return float((vit_key_bias[valid] == 0).float().mean())
