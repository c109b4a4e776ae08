"""Scone's understanding bridge on the BAGEL family (model.bagel.bridge), on the bagel-tiny fixture release
(4 layers, 112x112 images: 8x8 ViT tokens and 7x7 latent tokens per image)."""
import io
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import model.bagel.qwen2_mot as qwen2_mot
from model.bagel import family as fam
from model.bagel.bridge import BridgeHook, BridgeLayout, Reference, hard_bias, key_relevance, layout_of, relevance, \
    resize, soft_bias
from model.bagel.parity import load_image
from model.config import BridgeConfig, ModelConfig, StageConfig
from model.train import StageLoss

FIXTURE = Path(__file__).parent / "data" / "bagel-tiny"
SIZE = (112, 112)
N_LAT = 49  # 7x7 latent tokens of a 112x112 image


@pytest.fixture(scope="module")
def trainer():
    torch.manual_seed(0)
    return fam.load(FIXTURE / "release").eval()


@pytest.fixture(scope="module")
def model(trainer):
    return trainer.bagel


@pytest.fixture(scope="module")
def tok():
    return fam.tokenizer(FIXTURE / "release")


@pytest.fixture(scope="module")
def refs():
    ref = load_image(FIXTURE / "ref0.png")
    return [ref, ref.flip(-1)]


@pytest.fixture(scope="module")
def ids(tok):
    return tok.encode("the red cube from the first image on a table")


def _cfg(tau: float, early: int = 1, until: int = 2, **kw) -> BridgeConfig:
    return BridgeConfig(early_layer=early, apply_until=until, tau=tau, **kw)


def _split(s: list[torch.Tensor]) -> float:
    """A tau halfway between the two middle values of s: half the tokens masked, none within float noise of tau
    (s from a context alone and from context + target may differ in the last bits)."""
    v = torch.cat(s).sort().values
    k = len(v) // 2
    return float((v[k - 1] + v[k]) / 2)


def _median_tau(model, refs, ids, early: int = 1) -> float:
    return _split(model.bridge_relevance(model.generation_context(refs, ids), _cfg(0.0, early=early, until=early + 1)))


def _target_sample(model, refs, ids, x_t, t=0.5):
    sample = model.generation_context(refs, ids)
    model.add_latent(sample, x_t, 7, 7, timestep=t)
    return sample


@pytest.fixture(scope="module")
def x_t(model):
    return torch.randn(N_LAT, model.config.patch_latent_dim, generator=torch.Generator().manual_seed(3))


# ---- layout and threshold ----

def test_layout_counts_framing_tokens_and_pairs_each_reference_with_its_latents(model, refs, ids, x_t):
    sample = _target_sample(model, refs, ids, x_t)
    layout = layout_of(sample, model.special)
    positions = layout.instruction.tolist()
    by_position = dict(zip(sample.text_index, sample.text_ids))
    assert [by_position[p] for p in positions] == [model.special.bos, *ids, model.special.eos]
    assert len(layout.references) == 2
    for ref, vae, vit in zip(layout.references, sample.vae_images, sample.vit_images):
        assert torch.equal(ref.vit, vit.index) and ref.vit_grid == (8, 8)
        assert torch.equal(ref.latent, vae.index) and ref.latent_grid == (7, 7)
    # queries receiving the mask: the target's latent tokens, not its vision markers
    assert torch.equal(layout.targets, sample.vae_images[-1].index)
    # an instruction reduced to its framing (text dropped for guidance) leaves nothing to compare with
    dropped = model.generation_context(refs, [])
    assert layout_of(dropped, model.special) is None


def test_layouts_the_bridge_cannot_read_are_refused(model, refs, ids):
    late = model.generation_context(refs[:1], ids)
    model.add_reference(late, refs[1], vae=False)  # a ViT image after the instruction would see it
    with pytest.raises(ValueError, match="before the instruction"):
        layout_of(late, model.special)
    sample = type(late)()
    model.add_reference(sample, refs[0])
    model.add_reference(sample, refs[1], vae=False)
    sample.add_text(model.frame_text(ids))
    with pytest.raises(ValueError, match="pairs them in order"):
        layout_of(sample, model.special)
    with pytest.raises(ValueError, match="early_layer < apply_until < 4"):
        model.velocity(torch.zeros(N_LAT, model.config.patch_latent_dim), 0.5, SIZE, refs, ids,
                       bridge=_cfg(0.0, early=2, until=4))


def test_s_at_tau_is_kept_and_below_is_masked():
    tau = 0.25
    s = torch.tensor([tau - 1e-6, tau, tau + 1e-6, -1.0])
    covered = torch.tensor([True, True, True, False])
    assert hard_bias(s, covered, tau).tolist() == [float("-inf"), 0.0, 0.0, 0.0]


# ---- Eq. 1-4 by hand ----

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


def _hand_layout():
    """A 120-token sequence: reference 0 (4x4 ViT grid, 8x8 latent grid), reference 1 (3x5 ViT, 6x4 latent), then
    a 6-token instruction; positions scattered so that nothing depends on adjacency."""
    order = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    take = iter(np.split(order.numpy(), np.cumsum([16, 64, 15, 24, 6])))
    refs = tuple(Reference(torch.from_numpy(next(take)), vg, torch.from_numpy(next(take)), lg)
                 for vg, lg in (((4, 4), (8, 8)), ((3, 5), (6, 4))))
    return BridgeLayout(torch.from_numpy(next(take)), refs, torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("tau", [0.3, 0.5])
def test_relevance_and_mask_match_a_per_reference_loop_of_eq_1_to_4(tau):
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(16, generator=g)  # a common direction spreads the cosines around the threshold
    h = torch.randn(120, 16, generator=g) + 0.8 * shared
    layout = _hand_layout()
    s = relevance(h, layout)
    at, covered = key_relevance(s, layout, 120)
    bias = hard_bias(at, covered, tau)
    text = h[layout.instruction].double()
    text = text / text.norm(dim=-1, keepdim=True)  # Eq. 1
    expect_bias = np.zeros(120)
    for k, ref in enumerate(layout.references):
        vit = h[ref.vit].double()
        vit = vit / vit.norm(dim=-1, keepdim=True)  # Eq. 1
        s_k = (vit @ text.T).mean(dim=1).numpy()  # Eq. 2-3: the mean over the instruction of N_v x N_t cosines
        np.testing.assert_allclose(s[k].numpy(), s_k, atol=1e-6)
        s_lat = _bilinear(s_k.reshape(ref.vit_grid), *ref.latent_grid).reshape(-1)
        np.testing.assert_allclose(at[ref.latent].numpy(), s_lat, atol=1e-6)
        expect_bias[ref.vit.numpy()] = np.where(s_k >= tau, 0.0, -np.inf)  # Eq. 4
        expect_bias[ref.latent.numpy()] = np.where(s_lat >= tau, 0.0, -np.inf)
    # compare away from the threshold itself, where float rounding may legitimately flip a token
    decided = np.abs(at.numpy() - tau) > 1e-6
    assert np.array_equal(bias.numpy()[decided], expect_bias[decided])
    # the case is not trivial: kept and masked tokens on both grids; the instruction's own columns never masked
    ref_cols = torch.cat([torch.cat([r.vit, r.latent]) for r in layout.references])
    assert covered.sum() == len(ref_cols) and not covered[layout.instruction].any()
    assert (bias[ref_cols] == 0).sum() > 5 and torch.isinf(bias[ref_cols]).sum() > 5
    assert (bias[layout.instruction] == 0).all()


def test_relevance_resize_is_bilinear_half_pixel():
    s = torch.arange(16.0)
    ours = resize(s, (4, 4), (8, 8)).reshape(8, 8).numpy()
    assert np.allclose(ours, _bilinear(np.arange(16.0).reshape(4, 4), 8, 8))
    wide = resize(torch.arange(15.0), (3, 5), (6, 4)).reshape(6, 4).numpy()
    assert np.allclose(wide, _bilinear(np.arange(15.0).reshape(3, 5), 6, 4))


def test_soft_bias_is_log_sigmoid_of_the_scaled_margin_on_reference_keys_only():
    s = torch.tensor([0.9, 0.5, -0.5, 0.0, 0.7])
    covered = torch.tensor([True, True, True, True, False])
    soft = soft_bias(s, covered, tau=0.5, temperature=0.25)
    expected = [math.log(1 / (1 + math.exp(-(x - 0.5) / 0.25))) for x in (0.9, 0.5, -0.5, 0.0)] + [0.0]
    assert torch.allclose(soft, torch.tensor(expected), atol=1e-5)
    # the hard mask keeps exactly the reference tokens whose surrogate is at or above log(1/2)
    hard = hard_bias(s, covered, 0.5)
    assert torch.equal(hard == 0, (soft >= math.log(0.5)) | ~covered)


def test_soft_bias_tends_to_the_hard_mask_and_does_not_saturate_below_tau():
    covered = torch.ones(2, dtype=torch.bool)
    cold = soft_bias(torch.tensor([0.95, 0.2]), covered, tau=0.9, temperature=1e-3)
    assert cold[0] > -1e-6 and cold[1] < -600  # kept ~ 0, masked ~ -inf
    # d bias / d s at s = 0.2, far below tau: ~ 1 / T (log-sigmoid is linear there), so a masked token can open
    s = torch.tensor([0.95, 0.2], requires_grad=True)
    soft_bias(s, covered, tau=0.9, temperature=0.1).sum().backward()
    assert abs(float(s.grad[1]) - 10 * (1 - 1 / (1 + math.exp(7)))) < 1e-4 and float(s.grad[1]) > 9.9


# ---- structure: references never see the instruction, cached == uncached ----

@torch.no_grad()
def test_reference_tokens_never_attend_to_the_instruction(model, refs, ids, x_t):
    sample = _target_sample(model, refs, ids, x_t)
    layout = layout_of(sample, model.special)
    mask = sample.attention_mask()
    ref_rows = torch.cat([torch.cat([r.vit, r.latent]) for r in layout.references])
    assert not mask[ref_rows][:, layout.instruction].any()
    assert mask[layout.targets][:, layout.instruction].all()  # while the target sees it

    # so their states (which give s) do not depend on what the instruction says, bridge on or off
    other = [i + 1 for i in ids]
    cfg = _cfg(_median_tau(model, refs, ids))
    a = model.hidden_states([_target_sample(model, refs, ids, x_t)], bridge=cfg)[0][0]
    b = model.hidden_states([_target_sample(model, refs, other, x_t)], bridge=cfg)[0][0]
    assert torch.equal(a[ref_rows], b[ref_rows])
    assert not torch.allclose(a[layout.targets], b[layout.targets])


@torch.no_grad()
def test_cached_context_applies_its_mask_like_the_uncached_sequence(model, refs, ids, x_t):
    cfg = _cfg(_median_tau(model, refs, ids))
    uncached = model.velocity(x_t, 0.5, SIZE, refs, ids, bridge=cfg)
    context = model.encode_context(model.generation_context(refs, ids), bridge=cfg)
    assert context.bridge_layers == (2, 2) and torch.isneginf(context.bridge_bias).any()
    cached = model.velocity_from_context(context, x_t, 0.5, SIZE)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-5)
    # the mask matters, and a context encoded without it gives the plain velocity
    plain = model.velocity(x_t, 0.5, SIZE, refs, ids)
    assert (uncached - plain).abs().max() > 1e-3
    no_mask = model.encode_context(model.generation_context(refs, ids))
    assert no_mask.bridge_bias is None
    torch.testing.assert_close(model.velocity_from_context(no_mask, x_t, 0.5, SIZE), plain, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="encode_context"):
        model.hidden_states([context.sample.continuation()], past=[context], bridge=cfg)


@torch.no_grad()
def test_bridge_off_and_a_bridge_that_keeps_everything_leave_outputs_unchanged(trainer, model, refs, ids, x_t, tok):
    plain = model.velocity(x_t, 0.5, SIZE, refs, ids)
    assert torch.equal(model.velocity(x_t, 0.5, SIZE, refs, ids, bridge=None), plain)
    # tau = -1 keeps every token (s >= -1 always): the mask is all zeros and nothing moves, bit for bit
    assert torch.equal(model.velocity(x_t, 0.5, SIZE, refs, ids, bridge=_cfg(-1.0)), plain)
    batch = fam.collate(fam.examples_from_rows(_rows(3)), tok, ModelConfig())
    base = trainer.packed_forward(batch, torch.Generator().manual_seed(0))
    keep_all = trainer.packed_forward(batch, torch.Generator().manual_seed(0), bridge=_cfg(-1.0))
    assert base["bridge_kept"] is None and float(keep_all["bridge_kept"]) == 1.0
    for key in ("velocity", "logits"):
        assert torch.equal(base[key], keep_all[key]), key


# ---- attention: who is masked, where ----

class _Recorder:
    """Stands in for torch's SDPA inside the language model and keeps each call's attention probabilities."""

    def __init__(self):
        self.probs = []

    def __call__(self, q, k, v, attn_mask=None, **_):
        logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            add = attn_mask if attn_mask.is_floating_point() else torch.zeros(attn_mask.shape).masked_fill(
                ~attn_mask, float("-inf"))
            logits = logits + add.float()
        p = torch.softmax(logits, dim=-1)
        self.probs.append(p)
        return (p @ v.float()).to(q.dtype)


def _record(monkeypatch, fn):
    rec = _Recorder()
    proxy = types.SimpleNamespace(**{n: getattr(torch.nn.functional, n) for n in dir(torch.nn.functional)
                                     if not n.startswith("__")})
    proxy.scaled_dot_product_attention = rec
    with monkeypatch.context() as patch:
        patch.setattr(qwen2_mot, "F", proxy)
        fn()
    return rec.probs  # one per layer for a single sample


@torch.no_grad()
def test_masked_reference_tokens_get_zero_attention_from_the_target_in_masked_layers_only(
        monkeypatch, model, refs, ids, x_t):
    tau = _median_tau(model, refs, ids, early=0)
    cfg = _cfg(tau, early=0, until=2)  # masked layers 1 and 2; layers 0 and 3 are open
    sample = _target_sample(model, refs, ids, x_t)
    layout = layout_of(sample, model.special)
    s = model.bridge_relevance(model.generation_context(refs, ids), cfg)
    ref = layout.references[0]
    low, high = ref.vit[s[0] < tau], ref.vit[s[0] >= tau]
    assert len(low) and len(high)
    probs = _record(monkeypatch, lambda: model.hidden_states([sample], bridge=cfg))
    assert len(probs) == 4
    rows = layout.targets
    for n, p in enumerate(probs):
        to_low = p[:, rows][:, :, low]
        if n in (1, 2):
            assert float(to_low.abs().max()) == 0.0, n
        else:
            assert bool((to_low > 0).all()), n
        assert bool((p[:, rows][:, :, high] > 0).all()), n  # kept tokens stay visible
        # only target queries are masked: the instruction's last token still reads the low-relevance tokens
        assert bool((p[:, layout.instruction[-1]][:, low] > 0).all()), n
    # the reference's latent tokens follow its relevance resized onto the latent grid
    from model.bagel.bridge import resize
    s_lat = resize(s[0], (8, 8), (7, 7))
    lat_low = ref.latent[s_lat < tau]
    assert len(lat_low) and float(probs[1][:, rows][:, :, lat_low].abs().max()) == 0.0
    assert bool((probs[1][:, rows][:, :, ref.latent[s_lat >= tau]] > 0).all())


@torch.no_grad()
def test_a_token_with_s_equal_to_tau_is_kept(monkeypatch, model, refs, ids, x_t):
    sample = _target_sample(model, refs, ids, x_t)
    s = model.bridge_relevance(sample, _cfg(0.0, early=0, until=2))[0]  # this very sequence: the same bits
    order = s.argsort()
    at, below = order[len(s) // 2], order[len(s) // 2 - 1]
    assert s[below] < s[at]
    cfg = _cfg(float(s[at]), early=0, until=2)  # a float32 value, exact as a Python float
    ref = layout_of(sample, model.special).references[0]
    probs = _record(monkeypatch, lambda: model.hidden_states([sample], bridge=cfg))
    rows = layout_of(sample, model.special).targets
    assert bool((probs[1][:, rows][:, :, ref.vit[at]] > 0).all())
    assert float(probs[1][:, rows][:, :, ref.vit[below]].abs().max()) == 0.0


@torch.no_grad()
def test_a_target_with_every_reference_token_masked_still_sees_text_and_itself(monkeypatch, model, refs, ids, x_t):
    cfg = _cfg(1.0, early=0, until=2)  # cosine < 1 everywhere here: every reference token masked
    sample = _target_sample(model, refs, ids, x_t)
    layout = layout_of(sample, model.special)
    probs = _record(monkeypatch, lambda: model.hidden_states([sample], bridge=cfg))
    ref_cols = torch.cat([torch.cat([r.vit, r.latent]) for r in layout.references])
    p = probs[1][:, layout.targets]
    assert float(p[:, :, ref_cols].abs().max()) == 0.0
    assert bool((p[:, :, layout.instruction].sum(-1) > 0).all())
    assert bool((p[:, :, layout.targets].sum(-1) > 0).all())
    v = model.velocity(x_t, 0.5, SIZE, refs, ids, bridge=cfg)
    assert torch.isfinite(v).all()


@torch.no_grad()
def test_no_mask_when_the_instruction_is_dropped(trainer, model, refs, x_t, tok):
    cfg = _cfg(1.0)  # would mask every reference token if it applied
    plain = model.velocity(x_t, 0.5, SIZE, refs, [])
    assert torch.equal(model.velocity(x_t, 0.5, SIZE, refs, [], bridge=cfg), plain)
    assert model.encode_context(model.generation_context(refs, []), bridge=cfg).bridge_bias is None
    batch = fam.collate(fam.examples_from_rows(_rows(2)), tok, ModelConfig(cfg_drop_text=1.0, cfg_drop_image=0.0))
    trainer.train()
    try:
        off = trainer.packed_forward(batch, torch.Generator().manual_seed(0))
        on = trainer.packed_forward(batch, torch.Generator().manual_seed(0), bridge=cfg)
    finally:
        trainer.eval()
    assert on["drop_text"] == [True, True] and on["bridge_kept"] is None
    assert torch.equal(on["velocity"], off["velocity"])


# ---- training ----

def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = rng.integers(0, 256, (32, 32, 3)), rng.integers(0, 256, (32, 32, 3))
        qa = json.dumps([["is the cube red", "yes"]]) if i == 0 else None
        rows.append({"image": [_png(a), _png(b), _png(a[:, ::-1])], "instruction": f"mirror the cube of image {i}",
                     "key": f"s2i-{i:04d}", "qa": qa})
    return rows


def _trainable(m):
    for p in m.parameters():
        p.requires_grad_(False)
    params = [p for e in ("understanding", "generation") for p in m.expert_parameters(e)]
    for p in params:
        p.requires_grad_(True)
    return params


def _batch_tau(trainer, batch) -> float:
    m = trainer.bagel
    s = []
    for sm in batch["samples"]:
        ctx = m.generation_context([batch["pixels"][i] for i in sm["refs"]], sm["text"])
        s += m.bridge_relevance(ctx, _cfg(0.0))
    return _split(s)


def test_straight_through_keeps_the_forward_and_trains_the_understanding_expert_through_s(tok):
    trainer = fam.load(FIXTURE / "release").eval()
    _trainable(trainer)
    batch = fam.collate(fam.examples_from_rows(_rows(2)), tok, ModelConfig())
    with torch.no_grad():
        cfg = _cfg(_batch_tau(trainer, batch))

    def grads(straight_through):
        trainer.zero_grad(set_to_none=True)
        out = trainer.packed_forward(batch, torch.Generator().manual_seed(0), bridge=cfg,
                                     straight_through=straight_through)
        loss = torch.nn.functional.mse_loss(out["velocity"], out["velocity_target"])
        loss.backward()
        return out, {n: p.grad.clone() for n, p in trainer.bagel.named_parameters() if p.grad is not None}

    hard, g_hard = grads(False)
    soft, g_soft = grads(True)
    assert 0.0 < float(hard["bridge_kept"]) < 1.0
    assert torch.equal(soft["velocity"], hard["velocity"])  # forward: the exact mask of Eq. 4
    layer = "language_model.model.layers"
    # what produces s (understanding expert up to the early layer) gets the surrogate's extra gradient ...
    for name in (f"{layer}.0.self_attn.q_proj.weight", f"{layer}.1.mlp.up_proj.weight", "connector.fc2.weight"):
        assert (g_soft[name] - g_hard[name]).abs().max() > 1e-9, name
    # ... and nothing after it does: the soft term's q, k, v are detached
    for name in (f"{layer}.3.mlp_moe_gen.up_proj.weight", f"{layer}.2.self_attn.q_proj_moe_gen.weight", "llm2vae.weight"):
        torch.testing.assert_close(g_soft[name], g_hard[name], rtol=1e-5, atol=1e-9, msg=name)


def test_training_loss_with_the_bridge_learns_on_a_repeated_batch(tok):
    trainer = fam.load(FIXTURE / "release").train()
    params = _trainable(trainer)
    batch = fam.collate(fam.examples_from_rows(_rows(2)), tok, ModelConfig(cfg_drop_text=0.0, cfg_drop_image=0.0))
    with torch.no_grad():
        cfg = _cfg(_batch_tau(trainer, batch))
    with pytest.raises(ValueError, match="bridge_config"):
        trainer.training_loss(batch, bridge=True)
    # the stage trainer's call: StageLoss hands the params' BridgeConfig to a family that takes it
    stage_loss = StageLoss(trainer, bridge=True, und_loss_weight=0.1, bridge_straight_through=True,
                           bridge_config=cfg)
    assert stage_loss.bridge_config == cfg
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(5):
        out = stage_loss(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_stage_loss_passes_no_bridge_config_to_a_family_without_the_argument():
    class Toy(torch.nn.Module):
        def training_loss(self, batch, *, bridge, und_loss_weight=0.1, bridge_straight_through=False,
                          generator=None):
            return {"bridge": bridge}

    loss = StageLoss(Toy(), bridge=True, und_loss_weight=0.1, bridge_config=_cfg(0.5))
    assert loss.bridge_config is None and loss({}) == {"bridge": True}


def test_every_module_runs_once_in_the_same_order_with_the_bridge_on(trainer, tok):
    """ZeRO-3: every rank must call the same modules in the same order, whatever its micro batch holds."""
    calls = []
    handles = [mod.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
               for name, mod in trainer.bagel.named_modules() if name]
    batch = fam.collate(fam.examples_from_rows(_rows(2)), tok, ModelConfig())
    dropped = fam.collate(fam.examples_from_rows(_rows(2)), tok, ModelConfig(cfg_drop_text=1.0, cfg_drop_image=0.0))
    orders = []
    try:
        for b, cfg, st, train in ((batch, None, False, False), (batch, _cfg(0.05), True, False),
                                  (dropped, _cfg(0.05), True, True)):
            calls.clear()
            trainer.train(train)
            trainer.packed_forward(b, torch.Generator().manual_seed(0), bridge=cfg, straight_through=st)
            orders.append(list(calls))
    finally:
        trainer.eval()
        for h in handles:
            h.remove()
    assert orders[0] and orders[0] == orders[1] == orders[2]


def test_hook_without_targets_changes_no_mask(model, refs, ids):
    sample = model.generation_context(refs, ids)
    hook = BridgeHook.from_config(_cfg(1.0), [sample], model.special, 4)
    masks = [sample.attention_mask()]
    assert hook.before_layer(2, masks) == (masks, None)


def test_straight_through_is_ignored_without_the_bridge(trainer, tok):
    batch = fam.collate(fam.examples_from_rows(_rows(2)), tok, ModelConfig())
    with torch.no_grad():
        plain = trainer.training_loss(batch, generator=torch.Generator().manual_seed(3))
        switched = trainer.training_loss(batch, bridge=False, bridge_straight_through=True, bridge_config=_cfg(1.0),
                                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain["loss"], switched["loss"])


def test_bridge_and_straight_through_settings_validate():
    with pytest.raises(ValidationError, match="bridge_straight_through"):
        StageConfig(datasets=["x"], steps=1, lr=1e-3, bridge_straight_through=True)
    assert StageConfig(datasets=["x"], steps=1, lr=1e-3, bridge=True, bridge_straight_through=True).bridge
    with pytest.raises(ValidationError):
        BridgeConfig(soft_temperature=0.0)
    with pytest.raises(ValidationError, match="early_layer < apply_until"):
        BridgeConfig(early_layer=2, apply_until=2)
    # params' bridge against the layers of the release the chain makes (the preset's); a given release is the
    # model's to check (test_layouts_the_bridge_cannot_read_are_refused)
    with pytest.raises(ValidationError, match="early_layer < apply_until < num_layers=4"):
        ModelConfig(bridge=_cfg(0.5, early=1, until=4))
    assert ModelConfig(preset="bagel-7b", bridge=_cfg(0.5, early=8, until=16)).bridge.apply_until == 16
    assert ModelConfig(release="/releases/scone", bridge=_cfg(0.5, early=8, until=16)).release


def test_stage_loss_passes_the_straight_through_switch_only_when_set():
    seen = []

    class Fake(torch.nn.Module):
        def training_loss(self, batch, **kw):
            seen.append(kw)
            return {}

    StageLoss(Fake(), bridge=True, und_loss_weight=0.1, bridge_straight_through=True)({})
    StageLoss(Fake(), bridge=True, und_loss_weight=0.1)({})  # families without the knob keep working
    assert seen[0]["bridge_straight_through"] is True and "bridge_straight_through" not in seen[1]
    assert seen[0]["bridge"] is True and seen[1]["und_loss_weight"] == 0.1
