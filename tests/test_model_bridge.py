"""Semantic mask (Scone Eq. 1-5) against a direct per-sample, per-reference loop, and where the model applies it."""
import math

import numpy as np
import pytest
import torch

import model.modeling as modeling
from model.bridge import kept_fraction, resize_relevance, semantic_mask
from model.config import BridgeConfig, ModelConfig
from model.modeling import SconeModel


def _bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), written out by hand."""
    in_h, in_w = grid.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = min(int(math.floor(y)), in_h - 1)
        y1, wy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = min(int(math.floor(x)), in_w - 1)
            x1, wx = min(x0 + 1, in_w - 1), x - x0
            top = (1 - wx) * grid[y0, x0] + wx * grid[y0, x1]
            bottom = (1 - wx) * grid[y1, x0] + wx * grid[y1, x1]
            out[i, j] = (1 - wy) * top + wy * bottom
    return out


def _loop_reference(vit, text, text_valid, ref_valid, vit_grid, lat_grid, tau):
    """Eq. 1-4 sample by sample, reference by reference, with the full cosine matrix."""
    b, r, nv, _ = vit.shape
    nl = lat_grid[0] * lat_grid[1]
    vit_bias, lat_bias = np.zeros((b, r, nv)), np.zeros((b, r, nl))
    s_vit, s_lat = np.full((b, r, nv), np.nan), np.full((b, r, nl), np.nan)
    for i in range(b):
        words = [j for j in range(text.shape[1]) if text_valid[i, j]]
        if not words:
            continue
        ht = text[i, words].double()
        ht = ht / ht.norm(dim=-1, keepdim=True)  # Eq. 1
        for k in range(r):
            if not ref_valid[i, k]:
                continue
            hv = vit[i, k].double()
            hv = hv / hv.norm(dim=-1, keepdim=True)  # Eq. 1
            cos = hv @ ht.T  # Eq. 2, N_v x N_t
            s = cos.mean(dim=1).numpy()  # Eq. 3
            s_vit[i, k] = s
            s_lat[i, k] = _bilinear(s.reshape(vit_grid), *lat_grid).reshape(-1)
            vit_bias[i, k] = np.where(s > tau, 0.0, -np.inf)  # Eq. 4
            lat_bias[i, k] = np.where(s_lat[i, k] > tau, 0.0, -np.inf)
    return vit_bias, lat_bias, s_vit, s_lat


@pytest.mark.parametrize("vit_grid,lat_grid", [((4, 4), (8, 8)), ((3, 5), (6, 4))])
def test_semantic_mask_matches_per_reference_loop(vit_grid, lat_grid):
    g = torch.Generator().manual_seed(0)
    b, r, t, d = 4, 3, 6, 16
    nv = vit_grid[0] * vit_grid[1]
    shared = torch.randn(d, generator=g)  # a common direction spreads the cosines around the threshold
    vit = torch.randn(b, r, nv, d, generator=g) + 0.8 * shared
    text = torch.randn(b, t, d, generator=g) + 0.8 * shared
    text_valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool()
    ref_valid = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]).bool()
    tau = 0.3
    vit_bias, lat_bias = semantic_mask(vit, text, text_valid, ref_valid, vit_grid, lat_grid, tau)
    ref_vit, ref_lat, s_vit, s_lat = _loop_reference(vit, text, text_valid, ref_valid, vit_grid, lat_grid, tau)
    assert vit_bias.shape == (b, r, nv) and lat_bias.shape == (b, r, lat_grid[0] * lat_grid[1])
    # compare away from the threshold itself, where float rounding may legitimately flip a token
    for ours, ref, s in ((vit_bias, ref_vit, s_vit), (lat_bias, ref_lat, s_lat)):
        decided = np.isnan(s) | (np.abs(s - tau) > 1e-6)
        assert np.array_equal(ours.numpy()[decided], ref[decided])
    # the case is not trivial: both kept and masked tokens of valid references, on both grids
    assert (ref_vit == 0).sum() > 5 and np.isinf(ref_vit).sum() > 5 and np.isinf(ref_lat).sum() > 5
    # no mask for padded references nor for the sample without instruction words
    assert bool((vit_bias[0, 2] == 0).all()) and bool((vit_bias[2] == 0).all()) and bool((lat_bias[2] == 0).all())
    assert 0.0 < kept_fraction(vit_bias, ref_valid) < 1.0


def test_relevance_resize_is_bilinear_half_pixel():
    s = torch.arange(16.0).reshape(1, 1, 16)
    ours = resize_relevance(s, 4, 8).reshape(8, 8).numpy()
    assert np.allclose(ours, _bilinear(np.arange(16.0).reshape(4, 4), 8, 8))


def test_threshold_rule_is_strict():
    # identical directions: s = 1 exactly; the paper keeps s > tau only, so tau = 1 masks it
    v = torch.ones(1, 1, 4, 2)
    t = torch.ones(1, 1, 2)
    ok = torch.ones(1, 1, dtype=torch.bool)
    kept, _ = semantic_mask(v, t, ok, ok, 2, 4, tau=0.99)
    masked, _ = semantic_mask(v, t, ok, ok, 2, 4, tau=1.0)
    assert bool((kept == 0).all()) and bool(torch.isinf(masked).all())


# ---------------------------------------------------------------------------------------------- in the model


def _model(tau: float = 0.0) -> SconeModel:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=4, num_heads=2,
                      bridge=BridgeConfig(early_layer=0, apply_until=2, tau=tau))
    model = SconeModel.from_model_config(cfg, vocab_size=20).eval()
    with torch.no_grad():  # the heads start at zero; give them weights so outputs depend on the inputs
        model.velocity_head.weight.normal_(0, 0.2)
    return model


def _batch(b: int = 3, r: int = 3, t: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    text_mask = torch.ones(b, t, dtype=torch.bool)
    text_mask[0, 3:] = False
    ref_mask = torch.ones(b, r, dtype=torch.bool)
    ref_mask[1, 2] = False
    return {
        "input_ids": torch.randint(4, 20, (b, t), generator=g),
        "text_mask": text_mask,
        "ref_pixels": torch.rand(b, r, 3, 32, 32, generator=g) * 2 - 1,
        "ref_mask": ref_mask,
    }


def _record_attention(monkeypatch, model, batch, bridge):
    calls, masks = [], []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask.detach().clone()))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    real_mask = modeling.semantic_mask

    def mask_spy(*args, **kw):
        out = real_mask(*args, **kw)
        masks.append(out)
        return out

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(modeling, "semantic_mask", mask_spy)
    x_t = torch.randn(batch["ref_mask"].shape[0], 64, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v = model.predict_velocity(batch, x_t, torch.full((x_t.shape[0],), 0.5), bridge=bridge)
    monkeypatch.undo()
    return calls, masks, v


def test_bridge_changes_only_target_rows_of_masked_reference_columns(monkeypatch):
    model, batch = _model(tau=0.43), _batch()  # about the median relevance of this untrained model
    b, t = batch["text_mask"].shape
    r = batch["ref_mask"].shape[1]
    n_vit, n_lat, n_tgt = 16, 64, 64
    n_ctx = t + r * (n_vit + n_lat)
    off, _, v_off = _record_attention(monkeypatch, model, batch, bridge=False)
    on, masks, v_on = _record_attention(monkeypatch, model, batch, bridge=True)
    n_layers = len(model.layers)
    assert len(off) == len(on) == 2 * n_layers and len(masks) == 1
    vit_bias, lat_bias = masks[0]
    assert bool(torch.isinf(vit_bias).any()) and bool((vit_bias == 0).any())  # some tokens masked, some kept
    # context queries (the first n_layers calls): identical masks with and without the bridge
    for (lq, lk, m_off), (_, _, m_on) in zip(off[:n_layers], on[:n_layers]):
        assert (lq, lk) == (n_ctx, n_ctx) and torch.equal(m_off, m_on)
    expected_extra = torch.cat(
        [torch.zeros(b, t), vit_bias.flatten(1), lat_bias.flatten(1), torch.zeros(b, n_tgt)], dim=1
    )
    for layer, ((lq, lk, m_off), (_, _, m_on)) in enumerate(zip(off[n_layers:], on[n_layers:])):
        assert (lq, lk) == (n_tgt, n_ctx + n_tgt)
        assert m_on.shape == (b, 1, 1, n_ctx + n_tgt)  # one key vector, broadcast over every target row
        if layer in (1, 2):  # early_layer + 1 .. apply_until
            assert torch.equal(m_on[:, 0, 0], m_off[:, 0, 0] + expected_extra)
        else:
            assert torch.equal(m_on, m_off)
    # text and target columns are never masked for target rows; padded keys are masked either way
    assert bool((on[n_layers + 1][2][:, 0, 0, -n_tgt:] == 0).all())
    assert bool(torch.isfinite(v_on).all()) and not torch.allclose(v_on, v_off)


def test_fully_masked_references_stay_defined_and_open_bridge_is_a_no_op():
    batch = _batch()
    x_t = torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(2))
    t = torch.full((3,), 0.3)
    closed = _model(tau=1.0)  # s <= 1 always: every reference token is masked for the target
    with torch.no_grad():
        ctx = closed.encode_context(batch, bridge=True)
        v = closed.velocity_from_context(ctx, x_t, t)
    text_cols = batch["text_mask"].shape[1]
    valid_ref_cols = ctx.bridge_bias[:, text_cols:][
        torch.cat([batch["ref_mask"].repeat_interleave(16, 1), batch["ref_mask"].repeat_interleave(64, 1)], 1)
    ]
    assert bool(torch.isinf(valid_ref_cols).all())
    assert bool(torch.isfinite(v).all())
    with torch.no_grad():
        dense = closed.predict_velocity_dense(batch, x_t, t, bridge=True)
    assert torch.allclose(v, dense, atol=1e-5)
    opened = _model(tau=-1.0)  # s > -1 for every token: nothing masked, same as no bridge
    with torch.no_grad():
        assert torch.allclose(opened.predict_velocity(batch, x_t, t, bridge=True),
                              opened.predict_velocity(batch, x_t, t, bridge=False), atol=1e-6)
