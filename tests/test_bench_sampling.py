import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.sampling import (INSTRUCTION, PhaseTimer, bench_examples, context_tokens, load_bench_pipeline,
                                 reference_images, run)
from flows.params import load_params
from release_edit import VELOCITY_HEAD, copy_with_weights, random_normal

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def tiny_params(tmp_path, release, steps=2):
    """params with the artifacts under tmp_path, the chain's bootstrapped release there a copy of `release`; the
    bridge on in stage2_step2, so the bench samples through the semantic mask."""
    from bagel_release import copy_release

    params = load_params(PARAMS, {"eval.sampling.steps": str(steps), "pipeline.artifacts": str(tmp_path / "artifacts"),
                                  "train.stages.stage2_step2.bridge": "true"})
    copy_release(release, tmp_path / "artifacts" / "release" / params.model.preset)
    return params


def test_reference_images_are_distinct_renders():
    refs = reference_images(4, case=1, size=32)
    assert len(refs) == 4 and all(r.shape == (32, 32, 3) and r.dtype == np.uint8 for r in refs)
    assert len({r.tobytes() for r in refs}) == 4
    ex = bench_examples(3, cases=2, size=32)
    assert [len(e.refs) for e in ex] == [3, 3]
    assert ex[0].instruction == ex[1].instruction  # one fixed instruction: only the references vary
    assert ex[0].refs[0].tobytes() != ex[1].refs[0].tobytes()


def test_context_grows_by_vit_plus_latent_tokens_per_reference(bagel_release, tmp_path):
    pipe, _ = load_bench_pipeline(tiny_params(tmp_path, bagel_release))
    cfg, side = pipe.model.config, pipe.image_size
    rows, cols = pipe.latent_grid
    # each reference: its latent tokens and its ViT tokens, each between <|vision_start|> and <|vision_end|>
    per_ref = rows * cols + 2 + (side // cfg.vit.patch_size) ** 2 + 2
    sizes = [context_tokens(pipe.model, pipe.tokenizer, n, side) for n in (1, 2, 3, 4)]
    assert np.diff(sizes).tolist() == [per_ref] * 3
    assert sizes[0] == per_ref + len(pipe.tokenizer.encode(INSTRUCTION)) + 2  # the instruction, framed


def test_phase_timer_counts_calls_and_restores_methods(bagel_release, tmp_path):
    from model.bagel.generate import generate

    pipe, _ = load_bench_pipeline(tiny_params(tmp_path, bagel_release))
    model, tok = pipe.model, pipe.tokenizer
    ex = bench_examples(2, cases=2, size=32)
    kwargs = dict(steps=3, cfg_text=3.0, cfg_image=1.5, seed=0, image_size=32)
    with PhaseTimer(model, lambda: None) as timer:
        generate(model, tok, ex, use_cache=True, **kwargs)
        assert timer.calls["encode_context"] == 3 * 2  # one context per guidance pass and case
        # one packed forward per step; the forwards inside encode_context are the contexts' time, not counted
        assert timer.calls["hidden_states"] == 3
        timer.reset()
        generate(model, tok, ex, use_cache=False, **kwargs)
        assert timer.calls == {"encode_context": 0, "hidden_states": 3}
        assert timer.seconds["hidden_states"] > 0
    assert "encode_context" not in vars(model) and "hidden_states" not in vars(model)  # class methods again


def test_run_writes_a_consistent_report(bagel_release, tmp_path):
    params = tiny_params(tmp_path, bagel_release)
    before = torch.get_num_threads()
    out = tmp_path / "bench" / "sampling.json"
    report = run(params, out, cases=2, repeats=2, cached_repeats=3, threads=1)
    assert json.loads(out.read_text()) == report
    assert torch.get_num_threads() == before
    assert report["threads"] == 1 and report["torch"] == torch.__version__ and report["cpu_count"] >= 1
    assert report["model_source"].startswith(f"release {tmp_path / 'artifacts' / 'release' / 'tiny'}")
    assert report["model"] == {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "image_size": 32}
    assert report["steps"] == 2 and report["guidance_passes"] == 3 and report["bridge"] is True
    assert report["repeats"] == {"cached": 3, "uncached": 2}
    cached, uncached = report["per_mode"]["cached"], report["per_mode"]["uncached"]
    assert list(cached) == ["1", "2", "3", "4"]
    for rows in (cached, uncached):
        for r in rows.values():
            assert r["per_case_ms"] >= r["per_case_ms_min"] > 0
            assert r["per_case_ms"] == pytest.approx(1000 * r["batch_s"] / 2, abs=0.01)
            assert 0 <= r["share_encode_context"] <= 1 and 0 <= r["share_steps"] <= 1
    assert all(r["share_encode_context"] == 0 for r in uncached.values())  # the dense path never encodes apart
    assert all(r["share_encode_context"] > 0 for r in cached.values())
    ratio = report["ratio_4ref_to_1ref"]
    assert ratio["cached"] == pytest.approx(cached["4"]["per_case_ms"] / cached["1"]["per_case_ms"], rel=1e-2)
    speedup_3 = uncached["3"]["per_case_ms"] / cached["3"]["per_case_ms"]
    assert report["cache_speedup"]["3"] == pytest.approx(speedup_3, rel=1e-2)
    assert report["aim_met"] == (ratio["cached"] <= 1.5)
    assert report["cached_dominant_phase_at_max_refs"] in ("encode_context", "steps", "other")
    growth = report["cached_growth_ms_per_case"]
    assert growth["total"] == pytest.approx(cached["4"]["per_case_ms"] - cached["1"]["per_case_ms"], abs=1e-2)
    assert growth["encode_context"] + growth["steps"] + growth["other"] == pytest.approx(growth["total"], abs=1e-2)
    assert all(r["encode_ms_per_case"] == 0 and r["steps_ms_per_case"] > 0 for r in uncached.values())
    assert 0 < report["cpu_utilisation"] <= 1.5


def test_a_stage2_checkpoint_is_used_when_present(bagel_release, tmp_path):
    params = tiny_params(tmp_path, bagel_release)
    ckpt = Path(params.pipeline.artifacts) / "checkpoints" / "stage2_step2"
    head = random_normal(0.1, 3)
    copy_with_weights(bagel_release, ckpt, {VELOCITY_HEAD: head})
    pipe, source = load_bench_pipeline(params)
    assert source == str(ckpt)
    assert torch.equal(pipe.model.llm2vae.weight, head(pipe.model.llm2vae.weight))  # not the release's zero head


def test_without_a_checkpoint_or_release_the_bench_says_what_to_run(tmp_path):
    params = load_params(PARAMS, {"pipeline.artifacts": str(tmp_path / "artifacts")})
    with pytest.raises(FileNotFoundError, match="scone bootstrap"):
        load_bench_pipeline(params)
