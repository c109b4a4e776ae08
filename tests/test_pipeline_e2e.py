"""The whole chain, small: `scone pipeline` in a fresh clone, then `dvc` finds it up to date.

One real run of everything (Prefect flow, DeepSpeed stages, SRUM round, oracle scoring, MLflow registry, gate,
report, dvc commit) on a shrunken params.yaml, so CI proves the README's first command end to end.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL = {
    "data": {"sizes": {"base": 24, "multi_candidate": 24, "bench_per_task": 2, "srum_prompts": 7, "mico": 9, "mige_edit": 4,
                       "t2i_pretrain": 14}},
    "train": {"micro_batch": 4, "stages": {
        "stage1_step1": {"steps": 6, "warmup_steps": 1},
        "stage1_step2": {"steps": 3, "warmup_steps": 0},
        "stage2_step1": {"steps": 3, "warmup_steps": 0},
        "stage2_step2": {"steps": 3, "warmup_steps": 0},
    }},
    "srum": {"steps": 2, "candidates": 2, "warmup_steps": 0},
    "eval": {"rounds": 1, "scorings": 2, "sampling": {"steps": 3}},
    "registry": {"gate": {"min_overall": 0.0}},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh clone of the working tree (tracked + untracked-not-ignored files) with the small params."""
    dst = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    params = _merge(yaml.safe_load((dst / "params.yaml").read_text()), SMALL)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PREFECT_HOME": str(dst / ".prefect"), "MLFLOW_TRACKING_URI": "",
           "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.invalid",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.invalid"}
    env.pop("MLFLOW_TRACKING_URI")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        _run(cmd, dst, env)
    _run(["scone", "pipeline"], dst, env)
    return dst, env


def test_pipeline_leaves_every_artifact(clone):
    root, _ = clone
    art = root / "artifacts"
    names = ["stage1_step1", "stage1_step2", "stage2_step1", "stage2_step2", "srum_round1"]
    for name in names:
        ckpt = art / "checkpoints" / name
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file(), name
        summary = json.loads((art / "scores" / name / name / "summary.json").read_text())
        assert 0.0 <= summary["average"]["Overall"] <= 10.0
        assert (art / "scores" / name / name / "score_try2").is_dir()  # 1 round x 2 scorings
    for ds in ("scone_single_candidate_base", "scone_multi_candidate", "sconeeval_bench", "srum_prompts"):
        assert json.loads((art / "validation" / f"{ds}.json").read_text())["success"] is True
    rewards = (art / "srum" / "round_1" / "rewards.jsonl").read_text().splitlines()
    assert rewards and all("vlm_rewards" in json.loads(line) for line in rewards)
    html = (art / "reports" / "index.html").read_text()
    for name in names:
        assert name in html
    for ds in ("mico", "mige_edit", "scone_multi_candidate"):  # data cards reach the report
        assert (art / "reports" / "datacards" / f"{ds}.png").is_file() and f"contact sheet {ds}" in html


def test_every_checkpoint_is_a_registered_version_with_a_gate_decision(clone):
    root, _ = clone
    con = sqlite3.connect(root / "artifacts" / "mlflow.db")
    versions = con.execute("select version, run_id from model_versions where name='scone-tiny'").fetchall()
    assert len(versions) == 5
    tags = dict(((v, k), val) for v, k, val in con.execute(
        "select version, key, value from model_version_tags where name='scone-tiny'"))
    for v, _ in versions:
        assert tags[(v, "gate.decision")] in ("promoted", "rejected")
        assert (v, "metric.sconeeval.overall") in tags
        assert len(tags[(v, "scone.data_hash")]) == 32  # md5 of the data the checkpoint trained on
        assert tags[(v, "scone.git_commit")] not in ("", "unknown")
    aliases = dict(con.execute("select alias, version from registered_model_aliases where name='scone-tiny'"))
    assert aliases["candidate"] == max(v for v, _ in versions)
    assert "champion" in aliases  # min_overall 0: the first version passes the gate
    # training curves reached MLflow
    run_id = versions[0][1]
    n = con.execute("select count(*) from metrics where run_uuid=? and key='loss'", (run_id,)).fetchone()[0]
    assert n >= 1


def test_a_second_run_reuses_everything(clone):
    root, env = clone
    out = _run(["scone", "pipeline"], root, env)
    log = out.stdout + out.stderr
    assert "scores up to date" in log and "SRUM round 1: up to date" in log
    con = sqlite3.connect(root / "artifacts" / "mlflow.db")
    assert con.execute("select count(*) from model_versions where name='scone-tiny'").fetchone()[0] == 5


def test_dvc_is_up_to_date_after_the_pipeline_and_sees_a_data_change(clone):
    root, env = clone
    status = _run(["dvc", "status"], root, env).stdout
    assert "up to date" in status, status
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["sizes"]["srum_prompts"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = _run(["dvc", "repro", "--dry"], root, env).stdout
    assert "build_srum_prompts" in dry
    assert "train@stage1_step1" not in dry  # training data untouched: Stage I is not re-run
