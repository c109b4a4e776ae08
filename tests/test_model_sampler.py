"""Sampling (Euler ODE, guidance, context cache, seeding) and the understanding read-out (yes_probability)."""
import numpy as np
import pytest
import torch

from model.batching import Example
from model.config import BridgeConfig, ModelConfig
from model.modeling import SconeModel
from model.sampler import _guided, case_noise, generate, guidance_passes, sample_latents
from model.tokenizer import build_tokenizer
from model.understand import yes_probability

CFG = ModelConfig(hidden_size=32, num_layers=3, num_heads=2, bridge=BridgeConfig(early_layer=0, apply_until=1, tau=0.3))
TOK = build_tokenizer(["put", "the", "red", "blue", "circle", "on", "beach", "is", "there", "a"])


def _model() -> SconeModel:
    torch.manual_seed(0)
    model = SconeModel.from_model_config(CFG, vocab_size=len(TOK))
    with torch.no_grad():
        model.velocity_head.weight.normal_(0, 0.2)
    return model


def _cases(n: int = 3) -> list[Example]:
    rng = np.random.default_rng(0)
    texts = ["put the red circle on the beach", "the blue circle", "a red circle"]
    return [Example(refs=[rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(1 + i % 3)],
                    instruction=texts[i % 3]) for i in range(n)]


def test_guidance_combination_by_hand():
    assert guidance_passes(1.0, 1.0) == ("full",)
    assert guidance_passes(3.0, 1.0) == ("full", "image")
    assert guidance_passes(3.0, 1.5) == ("full", "image", "none")
    full, image, none = torch.full((1, 2), 4.0), torch.full((1, 2), 2.0), torch.full((1, 2), 1.0)
    v = torch.cat([full, image, none])
    # none + s_I (image - none) + s_T (full - image) = 1 + 1.5 * 1 + 3 * 2
    assert torch.allclose(_guided(v, ("full", "image", "none"), 3.0, 1.5), torch.full((1, 2), 8.5))
    assert torch.allclose(_guided(v[:2], ("full", "image"), 3.0, 1.0), torch.full((1, 2), 8.0))


def test_euler_integrates_from_noise_to_image():
    model = _model()
    model.velocity_from_context = lambda ctx, x, t: torch.full_like(x, 0.5)  # constant field: x0 = eps - 0.5
    out = sample_latents(model, TOK, _cases(2), steps=5, cfg_text=3.0, cfg_image=1.5, seed=7, bridge=False)
    expect = torch.stack([case_noise(7, i, (64, 48)) for i in range(2)]) - 0.5
    assert torch.allclose(out, expect, atol=1e-6)


def test_cached_sampling_equals_recomputing_everything():
    model, cases = _model(), _cases(3)
    kw = dict(steps=4, cfg_text=3.0, cfg_image=1.5, seed=0, bridge=True)
    cached = sample_latents(model, TOK, cases, **kw)
    slow = sample_latents(model, TOK, cases, use_cache=False, **kw)
    assert torch.allclose(cached, slow, atol=1e-4)
    assert bool(torch.isfinite(cached).all()) and cached.abs().max() > 0.5
    per_case = sample_latents(model, TOK, cases, batch_size=1, **kw)
    assert torch.allclose(cached, per_case, atol=1e-4)  # noise and result do not depend on batching


def test_same_seed_same_images():
    model, cases = _model(), _cases(2)
    kw = dict(steps=3, cfg_text=2.0, cfg_image=1.0, bridge=False)
    a = generate(model, TOK, cases, seed=1, **kw)
    b = generate(model, TOK, cases, seed=1, **kw)
    c = generate(model, TOK, cases, seed=2, **kw)
    assert len(a) == 2 and a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert model.training  # generate restores the caller's mode
    assert generate(model, TOK, [], seed=0, **kw) == []


def test_yes_probability_reads_the_answer_head():
    torch.manual_seed(0)
    model = SconeModel.from_model_config(CFG, vocab_size=len(TOK))
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 220
    blue = np.zeros((32, 32, 3), np.uint8)
    blue[..., 2] = 220
    q = "is there a red circle"
    p = yes_probability(model, TOK, [red, blue], [q, q])
    assert p.shape == (2,) and np.allclose(p, 0.5)  # zero-initialised head: no opinion yet
    # teach it: yes for the red image, no for the blue one
    ids = torch.tensor([TOK.convert_tokens_to_ids(["[BOS]", "is", "there", "a", "red", "circle"])] * 2)
    mask = torch.ones_like(ids, dtype=torch.bool)
    from model.latent import to_unit

    pixels = to_unit(np.stack([red, blue]))
    answers = torch.tensor(TOK.convert_tokens_to_ids(["yes", "no"]))
    opt = torch.optim.AdamW(model.expert_parameters("understanding"), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model.answer_logits(pixels, ids, mask), answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = yes_probability(model, TOK, [red, blue], [q, q])
    assert p[0] > 0.8 and p[1] < 0.2
    with pytest.raises(ValueError, match="one question per image"):
        yes_probability(model, TOK, [red], [q, q])
