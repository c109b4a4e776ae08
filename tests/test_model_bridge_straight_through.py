"""Straight-through bridge formation: forward values are exactly Eq. 4-5, gradients reach s through the soft surrogate."""
import math

import pytest
import torch
from pydantic import ValidationError

from model.bridge import semantic_mask, soft_semantic_bias
from model.config import BridgeConfig, ModelConfig, StageConfig
from model.modeling import SconeConfig, SconeModel
from model.train import StageLoss


def _one_ref(s_values, dim: int = 2):
    """ViT states whose relevance to a single text state [1, 0] is exactly s_values (unit vectors at angle acos s)."""
    s = torch.tensor(s_values, dtype=torch.float32)
    vit = torch.stack([s, torch.sqrt(1 - s**2)], dim=-1).reshape(1, 1, len(s_values), dim)
    text = torch.tensor([[[3.0, 0.0]]])  # length does not matter after Eq. 1
    return vit, text


def test_soft_bias_is_log_sigmoid_of_scaled_margin_and_shares_the_mask_layout():
    vit, text = _one_ref([0.9, 0.5, -0.5, 0.0])
    ok = torch.ones(1, 1, dtype=torch.bool)
    soft, _ = soft_semantic_bias(vit, text, ok, ok, (2, 2), (4, 4), tau=0.5, temperature=0.25)
    expected = [math.log(1 / (1 + math.exp(-(x - 0.5) / 0.25))) for x in (0.9, 0.5, -0.5, 0.0)]
    assert torch.allclose(soft.flatten(), torch.tensor(expected), atol=1e-5)
    # the hard mask keeps exactly the tokens whose surrogate is above log(1/2)
    hard, _ = semantic_mask(vit, text, ok, ok, (2, 2), (4, 4), tau=0.5)
    assert torch.equal(hard == 0, soft > math.log(0.5))
    # no instruction words: the bridge stays open, bias 0 (as the hard mask)
    none = torch.zeros(1, 1, dtype=torch.bool)
    soft_open, lat_open = soft_semantic_bias(vit, text, none, ok, (2, 2), (4, 4), tau=0.5, temperature=0.25)
    assert bool((soft_open == 0).all()) and lat_open.shape == (1, 1, 16) and bool((lat_open == 0).all())
    with pytest.raises(ValueError, match="temperature"):
        soft_semantic_bias(vit, text, ok, ok, (2, 2), (4, 4), tau=0.5, temperature=0.0)


def test_soft_bias_tends_to_the_hard_mask_and_does_not_saturate_below_tau():
    vit, text = _one_ref([0.95, 0.2])
    vit.requires_grad_(True)
    ok = torch.ones(1, 1, dtype=torch.bool)
    cold, _ = soft_semantic_bias(vit, text, ok, ok, (1, 2), (1, 2), tau=0.9, temperature=1e-3)
    assert cold[0, 0, 0] > -1e-6 and cold[0, 0, 1] < -600  # kept ~ 0, masked ~ -inf
    soft, _ = soft_semantic_bias(vit, text, ok, ok, (1, 2), (1, 2), tau=0.9, temperature=0.1)
    # d bias / d s at s = 0.2, far below tau: ~ 1 / T (log-sigmoid is linear there), so a masked token can open
    s = torch.tensor([0.2], requires_grad=True)
    torch.nn.functional.logsigmoid((s - 0.9) / 0.1).backward()
    assert abs(float(s.grad) - 10 * (1 - 1 / (1 + math.exp(7)))) < 1e-4 and float(s.grad) > 9.9
    soft.sum().backward()
    assert float(vit.grad.abs().sum()) > 0


def _model(tau: float) -> SconeModel:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=4, num_heads=2,
                      bridge=BridgeConfig(early_layer=0, apply_until=2, tau=tau, soft_temperature=0.1))
    model = SconeModel.from_model_config(cfg, vocab_size=20).eval()
    with torch.no_grad():
        model.velocity_head.weight.normal_(0, 0.2)
    return model


def _batch(b: int = 3, r: int = 2, t: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    text_mask = torch.ones(b, t, dtype=torch.bool)
    text_mask[0, 3:] = False
    return {
        "input_ids": torch.randint(4, 20, (b, t), generator=g),
        "text_mask": text_mask,
        "ref_pixels": torch.rand(b, r, 3, 32, 32, generator=g) * 2 - 1,
        "ref_mask": torch.ones(b, r, dtype=torch.bool),
        "target_pixels": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
    }


def _loss_and_grads(model, batch, straight_through: bool):
    model.zero_grad()
    out = model.training_loss(batch, bridge=True, bridge_straight_through=straight_through,
                              generator=torch.Generator().manual_seed(3))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tau", [1.0, 0.4])  # every reference token masked / some masked
def test_straight_through_keeps_the_loss_and_only_adds_gradient_through_s(tau):
    model, batch = _model(tau), _batch()
    loss_hard, g_hard = _loss_and_grads(model, batch, straight_through=False)
    loss_ste, g_ste = _loss_and_grads(model, batch, straight_through=True)
    assert torch.equal(loss_hard, loss_ste)  # forward is exactly the hard mask of Eq. 4
    # s is read after layer 0 (early_layer): only what feeds layer-0 states can get the extra gradient
    upstream = ("und_embed.", "gen_embed.", "layers.0.")
    for name, g in g_hard.items():
        if not name.startswith(upstream):
            assert torch.allclose(g, g_ste[name], rtol=1e-5, atol=1e-7), name
    extra = sum(float((g_ste[n] - g_hard[n]).norm()) for n in g_hard if n.startswith("layers.0.und."))
    assert extra > 1e-6  # the generation loss now reaches the understanding states that form the mask


def test_straight_through_is_ignored_without_bridge_and_sampling_paths_are_unchanged():
    model, batch = _model(0.4), _batch()
    g = torch.Generator().manual_seed(3)
    off = model.training_loss(batch, bridge=False, bridge_straight_through=True, generator=g)["loss"]
    ref = model.training_loss(batch, bridge=False, generator=torch.Generator().manual_seed(3))["loss"]
    assert torch.equal(off, ref)
    with torch.no_grad():
        ctx = model.encode_context(batch, bridge=True)
    assert ctx.soft_target_bias is None  # sampling never builds the surrogate


def test_config_knobs_validate_and_round_trip():
    with pytest.raises(ValidationError, match="bridge_straight_through"):
        StageConfig(datasets=["x"], steps=1, lr=1e-3, bridge_straight_through=True)
    assert StageConfig(datasets=["x"], steps=1, lr=1e-3, bridge=True, bridge_straight_through=True).bridge
    with pytest.raises(ValidationError):
        BridgeConfig(soft_temperature=0.0)
    cfg = ModelConfig(bridge=BridgeConfig(tau=0.1, soft_temperature=0.2))
    back = SconeConfig.from_model_config(cfg, vocab_size=30).to_model_config()
    assert back.bridge == cfg.bridge


def test_stage_loss_passes_the_switch_only_when_set():
    seen = []

    class Fake(torch.nn.Module):
        def training_loss(self, batch, **kw):
            seen.append(kw)
            return {}

    StageLoss(Fake(), bridge=True, und_loss_weight=0.1, bridge_straight_through=True)({})
    StageLoss(Fake(), bridge=True, und_loss_weight=0.1)({})  # families without the knob keep working
    assert seen[0]["bridge_straight_through"] is True and "bridge_straight_through" not in seen[1]
    assert seen[0]["bridge"] is True and seen[1]["und_loss_weight"] == 0.1
