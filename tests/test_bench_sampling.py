import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.bench_sampling import PhaseTimer, bench_examples, context_tokens, load_model, reference_images, run
from flows.params import load_params
from model.modeling import SconeModel, save_checkpoint
from model.tokenizer import build_tokenizer

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def tiny_params(tmp_path, steps=2):
    return load_params(PARAMS, {
        "model.hidden_size": "32", "model.num_layers": "3", "model.num_heads": "2",
        "model.bridge.early_layer": "0", "model.bridge.apply_until": "1",
        "eval.sampling.steps": str(steps), "pipeline.artifacts": str(tmp_path / "artifacts"),
    })


def test_reference_images_are_distinct_renders():
    refs = reference_images(4, case=1, size=32)
    assert len(refs) == 4 and all(r.shape == (32, 32, 3) and r.dtype == np.uint8 for r in refs)
    assert len({r.tobytes() for r in refs}) == 4
    ex = bench_examples(3, cases=2, size=32)
    assert [len(e.refs) for e in ex] == [3, 3]
    assert ex[0].instruction == ex[1].instruction  # one fixed instruction: only the references vary
    assert ex[0].refs[0].tobytes() != ex[1].refs[0].tobytes()


def test_context_grows_by_vit_plus_latent_tokens_per_reference(tmp_path):
    params = tiny_params(tmp_path)
    model, tok, _ = load_model(params)
    per_ref = model.vit_grid**2 + model.latent_grid**2
    sizes = [context_tokens(model, tok, n) for n in (1, 2, 3, 4)]
    assert np.diff(sizes).tolist() == [per_ref] * 3


def test_phase_timer_counts_calls_and_restores_methods(tmp_path):
    model, tok, _ = load_model(tiny_params(tmp_path))
    from model.sampler import generate

    ex = bench_examples(2, cases=2, size=32)
    with PhaseTimer(model, lambda: None) as timer:
        generate(model, tok, ex, steps=3, cfg_text=3.0, cfg_image=1.5, seed=0, bridge=False, use_cache=True)
        assert timer.calls["encode_context"] == 1
        assert timer.calls["velocity_from_context"] == 3
        assert timer.calls["predict_velocity_dense"] == 0
        timer.reset()
        generate(model, tok, ex, steps=3, cfg_text=3.0, cfg_image=1.5, seed=0, bridge=False, use_cache=False)
        assert timer.calls == {"encode_context": 0, "velocity_from_context": 0, "predict_velocity_dense": 3}
        assert timer.seconds["predict_velocity_dense"] > 0
    assert "encode_context" not in vars(model)  # the class method shows through again


def test_run_writes_a_consistent_report(tmp_path):
    params = tiny_params(tmp_path)
    before = torch.get_num_threads()
    out = tmp_path / "bench" / "sampling.json"
    report = run(params, out, cases=2, repeats=2, cached_repeats=3, threads=1)
    assert json.loads(out.read_text()) == report
    assert torch.get_num_threads() == before
    assert report["threads"] == 1 and report["torch"] == torch.__version__ and report["cpu_count"] >= 1
    assert report["model_source"].startswith("fresh init")
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


def test_a_stage2_checkpoint_is_used_when_present(tmp_path):
    params = tiny_params(tmp_path)
    torch.manual_seed(3)
    tok = build_tokenizer()
    trained = SconeModel.from_model_config(params.model, len(tok))
    ckpt = Path(params.pipeline.artifacts) / "checkpoints" / "stage2_step2"
    save_checkpoint(trained, tok, ckpt)
    model, _, source = load_model(params)
    assert source == str(ckpt)
    for a, b in zip(model.parameters(), trained.parameters()):
        assert torch.equal(a, b)
