"""`scone bench ablation-stage2` on a tiny chain: every version trained from the Stage I checkpoint with the BAGEL
family and scored, the base being the release the chain starts from."""
import json
from pathlib import Path

import pytest

from bagel_release import copy_release

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.mark.slow
def test_every_version_trains_from_stage1_and_is_scored(bagel_release, tmp_path):
    from data.build import build_dataset
    from benchmarks.ablation_stage2 import run
    from flows.params import load_params
    from model.bagel.release import find_weights

    art = tmp_path / "artifacts"
    params = load_params(PARAMS, {
        "pipeline.artifacts": str(art), "data.root": str(art / "data"), "data.num_workers": "1",
        "data.sizes.base": "16", "data.sizes.multi_candidate": "16", "data.sizes.t2i_pretrain": "16",
        "data.sizes.bench_per_task": "1", "eval.sampling.steps": "2", "train.micro_batch": "4",
        "data.sizes.mico": "8", "data.sizes.mige_edit": "4", "data.sizes.und_pretrain": "8",
    })
    # every dataset of the Stage II steps' mixtures (MICo, MIGE and understanding rows ride along)
    for name in ("scone_single_candidate_base", "scone_single_candidate_refined", "scone_multi_candidate",
                 "t2i_pretrain", "mico", "mige_edit", "und_pretrain", "sconeeval_bench"):
        build_dataset(name, params.data)
    with pytest.raises(FileNotFoundError, match="stage1_step2 holds no checkpoint"):
        run(params, art / "bench" / "ablation-stage2.json", steps=1, seeds=(0,), taus=(0.5,))
    copy_release(bagel_release, art / "release" / params.model.preset)
    copy_release(bagel_release, art / "checkpoints" / "stage1_step2")

    out = art / "bench" / "ablation-stage2.json"
    out.parent.mkdir(parents=True)
    result = run(params, out, steps=1, seeds=(0, 1), taus=(0.5,))

    assert json.loads(out.read_text()) == result
    versions = result["versions"]
    assert list(versions) == ["base", "stage1", "stage2_a_direct", "stage2_b_two_step", "stage2_c_two_step_bridge"]
    assert versions["base"]["label"] == "bootstrapped tiny (fresh weights)"
    for row in versions.values():
        assert 0.0 <= row["Overall"]["mean"] <= 10.0
    assert all(len(versions[v]["Overall"]["runs"]) == 2 for v in list(versions)[2:])  # one per seed
    work = out.with_suffix("")
    settings = {p.parent.relative_to(work).as_posix(): json.loads(p.read_text())
                for p in work.glob("*/*/run_settings.json")}
    assert set(settings) == {f"stage2_a_direct_s{s}/a_direct" for s in (0, 1)} | {
        f"stage2_b_two_step_s{s}/b_step{k}" for s in (0, 1) for k in (1, 2)} | {
        f"stage2_c_two_step_bridge_s{s}/c_step{k}" for s in (0, 1) for k in (1, 2)} | {
        "tau_0.5/c_step1", "tau_0.5/c_step2"}
    assert all(s["model_family"] == "model.bagel.family:BAGEL" for s in settings.values())
    first = settings["stage2_c_two_step_bridge_s1/c_step1"]
    assert first["stage"]["bridge"] and first["stage"]["bridge_straight_through"]
    assert not first["stage"]["train_generation"] and first["train"]["seed"] == 1
    assert settings["stage2_a_direct_s0/a_direct"]["stage"]["steps"] == 2  # 2N steps against N + N
    assert settings["tau_0.5/c_step2"]["model"]["bridge"]["tau"] == 0.5
    assert find_weights(work / "stage2_b_two_step_s0" / "b_step1").files  # written as a release
    assert set(result["tau_sweep"]) == {"0.5"}
    assert "| Base | bootstrapped tiny (fresh weights) |" in result["table5_markdown"]
