"""Sampler and self-judge of the BAGEL family (model.bagel.generate) on a fresh tiny-preset model whose velocity
head is random (not BAGEL's zero start), so velocities, latents and images depend on every input."""
import zlib

import numpy as np
import pytest
import torch

from model.bagel.config import preset
from model.bagel.family import _pixels
from model.bagel.generate import generate, sample_latents, yes_no_ids, yes_probability
from model.bagel.model import BagelModel
from model.batching import Example
from model.config import BridgeConfig
from model.scheduler import case_noise

SIDE = 32  # the tiny preset's side for the subject world's 32 px images


class WordTokenizer:
    """Whitespace words -> ids below the tiny preset's markers; 'yes' and 'no' single tokens."""

    def encode(self, text: str) -> list[int]:
        return [{"yes": 1, "no": 2}.get(w, 3 + zlib.crc32(w.encode()) % 400) for w in text.split()]


TOK = WordTokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = BagelModel(preset("tiny"))
    m.init_fresh()
    torch.nn.init.normal_(m.llm2vae.weight, std=0.05)
    torch.nn.init.normal_(m.llm2vae.bias, std=0.05)
    return m.eval()


def _cases(n: int, refs: int = 2, side: int = SIDE) -> list[Example]:
    rng = np.random.default_rng(5)
    return [Example(refs=[rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(refs)],
                    instruction=f"put the {['red', 'blue', 'green'][i % 3]} cube {i} on the left",
                    target=np.zeros((SIDE, SIDE, 3), np.uint8))
            for i in range(n)]


def _expected_one_step(model, example: Example, index: int, seed: int, cfg_text: float, cfg_image: float,
                       bridge: BridgeConfig | None = None):
    """x(0) after one Euler step from t = 1, from the model's own uncached `velocity` and layout."""
    refs = [_pixels(r, SIDE) for r in example.refs]
    ids = TOK.encode(example.instruction)
    x = case_noise(seed, index, (64, model.config.patch_latent_dim))
    with torch.no_grad():
        full = model.velocity(x, 1.0, (SIDE, SIDE), refs, ids, bridge=bridge)
        image = model.velocity(x, 1.0, (SIDE, SIDE), refs, [])
        none = model.velocity(x, 1.0, (SIDE, SIDE), [], [])
    v = none + cfg_image * (image - none) + cfg_text * (full - image)
    return model.tokens_to_latent(x - v, 8, 8)


@pytest.mark.parametrize("cfg", [(1.0, 1.0), (3.0, 1.5)])
def test_one_step_matches_the_models_velocity_and_the_training_conditions(model, cfg):
    cases = _cases(2)
    got = sample_latents(model, TOK, cases, steps=1, cfg_text=cfg[0], cfg_image=cfg[1], seed=11)
    for i, case in enumerate(cases):
        torch.testing.assert_close(got[i], _expected_one_step(model, case, i, 11, *cfg), atol=1e-5, rtol=1e-5)
    assert got[0].shape == (4, 16, 16) and not torch.allclose(got[0], got[1], atol=1e-2)  # 8 x 8 tokens of 2 x 2


def test_euler_integrates_from_noise_to_image(model, monkeypatch):
    import model.bagel.generate as generate_module

    # a constant velocity field v = 0.5 of every pass: whatever the guidance, x(0) = x(1) - 0.5 after any steps
    monkeypatch.setattr(generate_module, "_velocities",
                        lambda m, samples, past, bridge: torch.full((64 * len(samples), m.config.patch_latent_dim), 0.5))
    out = sample_latents(model, TOK, _cases(2), steps=5, cfg_text=3.0, cfg_image=1.5, seed=7, timestep_shift=2.0)
    for i, latent in enumerate(out):
        expect = model.tokens_to_latent(case_noise(7, i, (64, model.config.patch_latent_dim)) - 0.5, 8, 8)
        torch.testing.assert_close(latent, expect, atol=1e-6, rtol=0)


def test_cached_equals_uncached(model):
    kw = dict(steps=3, cfg_text=3.0, cfg_image=1.5, seed=3)
    cases = _cases(2)
    cached = sample_latents(model, TOK, cases, **kw)
    uncached = sample_latents(model, TOK, cases, use_cache=False, **kw)
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def bridge(model):
    """A bridge that masks about half of case 0's reference tokens in this model (tau: the median relevance)."""
    case = _cases(1)[0]
    sample = model.generation_context([_pixels(r, SIDE) for r in case.refs], TOK.encode(case.instruction))
    probe = BridgeConfig(early_layer=0, apply_until=3)
    with torch.no_grad():
        s = torch.cat(model.bridge_relevance(sample, probe)).sort().values
    # halfway between the two middle values, not at one: a token whose s sits exactly at tau would flip between
    # kept and masked with the last float32 bit, which differs between a packed batch and a lone sequence
    k = len(s) // 2
    return probe.model_copy(update={"tau": float(s[k - 1] + s[k]) / 2})


def test_the_bridge_masks_the_full_pass_only_and_caches_exactly(model, bridge):
    kw = dict(cfg_text=3.0, cfg_image=1.5, seed=4, bridge=bridge)
    cases = _cases(2)
    got = sample_latents(model, TOK, cases, steps=1, **kw)
    for i, case in enumerate(cases):
        torch.testing.assert_close(got[i], _expected_one_step(model, case, i, 4, 3.0, 1.5, bridge), atol=1e-5,
                                   rtol=1e-5)
    plain = sample_latents(model, TOK, cases, steps=1, cfg_text=3.0, cfg_image=1.5, seed=4)
    assert not torch.allclose(got[0], plain[0], atol=1e-3)
    cached = sample_latents(model, TOK, cases, steps=3, **kw)
    uncached = sample_latents(model, TOK, cases, steps=3, use_cache=False, **kw)
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_images_do_not_depend_on_batching_and_follow_the_seed(model):
    kw = dict(steps=2, cfg_text=3.0, cfg_image=1.5)
    cases = _cases(3)
    one = generate(model, TOK, cases, batch_size=1, seed=7, **kw)
    three = generate(model, TOK, cases, batch_size=3, seed=7, **kw)
    assert len(one) == 3
    for a, b in zip(one, three):
        assert a.shape == (SIDE, SIDE, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
    again = generate(model, TOK, cases, batch_size=2, seed=7, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(one, again))
    other = generate(model, TOK, cases, batch_size=3, seed=8, **kw)
    assert not any(np.array_equal(a, b) for a, b in zip(one, other))
    assert one[0].std() > 0 and not np.array_equal(one[0], one[1])


def test_noise_is_keyed_by_the_position_in_examples(model):
    kw = dict(steps=2, cfg_text=3.0, cfg_image=1.0, seed=7)
    cases = _cases(3)
    at_two = sample_latents(model, TOK, cases, **kw)[2]
    torch.testing.assert_close(at_two, sample_latents(model, TOK, cases, batch_size=2, **kw)[2], atol=1e-6, rtol=0)
    at_zero = sample_latents(model, TOK, cases[2:], **kw)[0]
    assert not torch.allclose(at_two, at_zero, atol=1e-2)


@pytest.mark.parametrize("cfg, passes", [((1.0, 1.0), 1), ((3.0, 1.0), 2), ((3.0, 1.5), 3), ((1.0, 1.5), 3)])
def test_guidance_runs_only_the_needed_passes_in_one_forward_per_step(model, monkeypatch, cfg, passes):
    calls = []
    real = model.hidden_states

    def counting(samples, past=None, keep=False, **kw):
        calls.append((len(samples), past is not None, keep))
        return real(samples, past=past, keep=keep, **kw)

    monkeypatch.setattr(model, "hidden_states", counting)
    sample_latents(model, TOK, _cases(2), steps=3, cfg_text=cfg[0], cfg_image=cfg[1], seed=0, batch_size=2)
    encodes = [c for c in calls if c[2]]
    steps = [c for c in calls if not c[2]]
    assert len(encodes) == 2 * passes  # each case's context of each pass, once
    assert steps == [(2 * passes, True, False)] * 3  # every case x pass of the chunk in one call per step


def test_output_side_follows_the_references_or_image_size(model):
    small = _cases(1, side=20)  # 20 px -> the tiny preset's next multiple of 8: 24
    assert generate(model, TOK, small, steps=1, cfg_text=1.0, cfg_image=1.0, seed=0)[0].shape == (24, 24, 3)
    resized = generate(model, TOK, small, steps=1, cfg_text=1.0, cfg_image=1.0, seed=0, image_size=32)
    assert resized[0].shape == (SIDE, SIDE, 3)
    text_only = [Example(refs=[], instruction="a red cube")]
    with pytest.raises(ValueError, match="image_size"):
        generate(model, TOK, text_only, steps=1, cfg_text=3.0, cfg_image=1.5, seed=0)
    out = generate(model, TOK, text_only, steps=1, cfg_text=3.0, cfg_image=1.5, seed=0, image_size=32)
    assert out[0].shape == (SIDE, SIDE, 3) and out[0].dtype == np.uint8
    assert generate(model, TOK, [], steps=1, cfg_text=3.0, cfg_image=1.5, seed=0) == []
    with pytest.raises(ValueError, match="uint8"):
        generate(model, TOK, [Example(refs=[np.zeros((32, 32, 3), np.float32)], instruction="x")], steps=1,
                 cfg_text=1.0, cfg_image=1.0, seed=0)


def test_model_mode_is_restored(model):
    model.train()
    try:
        sample_latents(model, TOK, _cases(1), steps=1, cfg_text=1.0, cfg_image=1.0, seed=0)
        yes_probability(model, TOK, [np.zeros((SIDE, SIDE, 3), np.uint8)], ["is it red"])
        assert model.training
    finally:
        model.eval()


def _judge_inputs():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (32, 32, 16, 32, 24)]
    questions = ["is there a red cube", "is the cube on the left", "is it blue", "yes", "is there a dog here"]
    return images, questions


def test_yes_probability_is_the_answer_softmax_and_batch_invariant(model):
    images, questions = _judge_inputs()
    p = yes_probability(model, TOK, images, questions)
    assert p.shape == (5,) and ((p >= 0) & (p <= 1)).all() and np.ptp(p) > 0
    np.testing.assert_allclose(yes_probability(model, TOK, images, questions, batch_size=2), p, atol=1e-6, rtol=0)
    for img, q, got in zip(images, questions, p):
        with torch.no_grad():
            logits = model.answer_logits([_pixels(img, img.shape[0])], TOK.encode(q))
        expect = torch.softmax(logits[[1, 2]].float(), dim=-1)[0].item()
        assert got == pytest.approx(expect, abs=1e-6)
    assert yes_probability(model, TOK, [], []).shape == (0,)
    with pytest.raises(ValueError, match="questions"):
        yes_probability(model, TOK, images, questions[:2])


def test_yes_probability_needs_single_token_answers(model):
    class ByteTokenizer:  # what an untrained byte-level BPE does to "yes": one token per byte
        def encode(self, text):
            return list(text.encode())

    assert yes_no_ids(TOK) == (1, 2)
    with pytest.raises(ValueError, match="single token"):
        yes_probability(model, ByteTokenizer(), [np.zeros((SIDE, SIDE, 3), np.uint8)], ["is it red"])
