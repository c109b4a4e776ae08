"""Fault injection on a small real chain: kills, code edits, corruptions, concurrency, relocation.

Every test here does to a fresh clone what a hostile but fair user would, and asserts the outcome: kill -9 at
several points then a re-run ends on the registry and scores of an uninterrupted run; a code edit in each
package makes DVC (the one authority) see exactly the dependent stages stale; byte flips, garbage images and a
dropped column are caught and named; concurrent writers leave no duplicate version; a moved checkout re-runs
nothing. (A crafted pickle is refused: tests/test_safe_state.py.) The tallies go to $SCONE_FAULT_REPORT as JSON
when set (docs/reliability.md shows them).
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.freshness import evaluate_stage

from chain_clone import CHECKPOINTS, kill_when, make_clone, run

pytestmark = pytest.mark.slow
TALLY = {"kills_survived": 0, "corruptions_detected_and_named": 0, "valid_rows_lost": 0, "stale_outputs_served": 0,
         "duplicate_versions": 0, "pickles_executed": 0, "concurrent_writers_refused": 0}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("SCONE_FAULT_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(TALLY, indent=1) + "\n")


def registry_state(root: Path) -> dict:
    """checkpoint -> (weights md5, Overall on the version, gate decision); plus the champion."""
    con = sqlite3.connect(root / "artifacts" / "mlflow.db")
    tags: dict[str, dict] = {}
    for version, key, value in con.execute("select version, key, value from model_version_tags where name='scone-tiny'"):
        tags.setdefault(version, {})[key] = value
    by_stage: dict[str, list] = {}
    for version, t in tags.items():
        by_stage.setdefault(t["scone.stage"], []).append(
            (t["checkpoint.weights_md5"], round(float(t["metric.sconeeval.overall"]), 6), t.get("gate.decision")))
    champion = con.execute("select v.value from registered_model_aliases a join model_version_tags v on "
                           "a.version = v.version and v.name = a.name where a.alias='champion' and "
                           "v.key='scone.stage'").fetchone()
    return {"versions": by_stage, "n_versions": sum(len(v) for v in by_stage.values()),
            "champion": champion[0] if champion else None}


def scores(root: Path) -> dict[str, float]:
    return {n: json.loads((root / "artifacts/scores" / n / n / "summary.json").read_text())["average"]["Overall"]
            for n in CHECKPOINTS}


def duplicates(state: dict) -> int:
    return sum(len(v) - 1 for v in state["versions"].values())


def stale_stages(root: Path, env: dict) -> set[str]:
    out = run(["dvc", "status", "--json"], root, env).stdout
    return set(json.loads(out[out.index("{"):]) if "{" in out else {})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: the outcome every faulty run must reproduce."""
    root, env = make_clone(tmp_path_factory.mktemp("reference"))
    run(["scone", "pipeline"], root, env)
    return root, env, registry_state(root), scores(root)


def test_kill9_at_several_points_then_rerun_matches_an_uninterrupted_run(reference, tmp_path_factory):
    _, _, ref_registry, ref_scores = reference
    root, env = make_clone(tmp_path_factory.mktemp("killed"))
    # inside a stage's training (after a state save), between steps, mid-scoring, mid-registration
    for marker, delay in (("train@stage1_step1: running", 6.0), ("train@stage2_step1: running", 1.0),
                          ("evaluate@stage1_step2: running", 3.0), ("register: running", 2.0)):
        log = kill_when(["scone", "pipeline"], root, env, marker, delay)
        assert marker in log
        TALLY["kills_survived"] += 1
    out = run(["scone", "pipeline"], root, env)
    assert "train@stage1_step1: up to date" in out.stderr + out.stdout  # finished work is not redone
    state = registry_state(root)
    assert state["n_versions"] == len(CHECKPOINTS) and duplicates(state) == 0
    assert state == ref_registry  # same weights, same scores, same gate decisions, same champion
    assert scores(root) == ref_scores
    assert not list((root / "artifacts").glob(".staging/*")) and stale_stages(root, env) == set()


# which stages DVC must see stale when one file of a package changes (the others follow by their inputs)
SCORES = {evaluate_stage(n) for n in ("und_pretrain", *CHECKPOINTS)}  # und_pretrain: scored on understanding
EDITS = {
    "evaluation/sconeeval.py": {"srum@srum_round1", *SCORES},
    # register too: the logged MLflow model generates its input example with the project's pipeline; the
    # bootstrap stages (tokenizer, autoencoder, ViT, release) name only the files they import, not the sampler
    "model/bagel/generate.py": {"srum@srum_round1", "register", *(f"train@{s}" for s in ("und_pretrain", *CHECKPOINTS[:4])),
                                *SCORES},
    "registry/gate.py": {"register", "report"},
    "dashboards/report.py": {"report"},
    "tasks/evaluate.py": SCORES,
}


@pytest.mark.parametrize("path", sorted(EDITS))
def test_a_code_edit_makes_exactly_its_dependent_stages_stale(reference, path):
    root, env, _, _ = reference
    original = (root / path).read_text()
    try:
        (root / path).write_text(original + "\n# edited\n")
        assert stale_stages(root, env) == EDITS[path]
    finally:
        (root / path).write_text(original)
    assert stale_stages(root, env) == set()


def test_an_edit_to_data_code_makes_everything_downstream_of_data_stale(reference):
    root, env, _, _ = reference
    original = (root / "data/render.py").read_text()
    try:
        (root / "data/render.py").write_text(original + "\n# edited\n")
        stale = stale_stages(root, env)
    finally:
        (root / "data/render.py").write_text(original)
    assert {"build_base", "validate_data", "bootstrap_tokenizer", "train@stage1_step1", "evaluate_srum@srum_round1",
            "register", "report"} <= stale


def test_a_byte_flip_in_a_shard_is_seen_and_the_shard_rebuilt(reference):
    root, env, ref_registry, _ = reference
    shard = sorted((root / "artifacts/data/parquet_data/t2i_pretrain").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    size = len(data)
    data[size // 2] ^= 0xFF  # same size: only content hashes notice
    shard.write_bytes(bytes(data))
    assert "build_t2i_pretrain" in stale_stages(root, env)
    TALLY["corruptions_detected_and_named"] += 1
    out = run(["scone", "pipeline"], root, env)
    log = out.stdout + out.stderr
    assert "build_t2i_pretrain: running" in log and "train@stage1_step1: up to date" in log  # rebuilt identical
    assert registry_state(root) == ref_registry and stale_stages(root, env) == set()


def _rewrite_shard(path: Path, fn) -> None:
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


def test_garbage_image_is_quarantined_and_a_dropped_column_named(reference):
    import pyarrow as pa

    root, env, _, _ = reference
    data = root / "artifacts/data"
    base = sorted((data / "parquet_data/scone_single_candidate_base").glob("*.parquet"))[0]
    rows_before = sum(pq.read_metadata(p).num_rows for p in base.parent.glob("*.parquet"))

    def garbage_first_image(table):
        images = table.column("image").to_pylist()
        images[0] = [b"this is not a png"] + images[0][1:]
        return table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, table.schema.field("image").type))

    _rewrite_shard(base, garbage_first_image)
    bad_key = pq.read_table(base).column("key").to_pylist()[0]
    mige = sorted((data / "parquet_data/mige_edit").glob("*.parquet"))[0]
    _rewrite_shard(mige, lambda t: t.drop_columns(["instruction"]))
    try:
        proc = run(["scone", "data", "validate", "all"], root, env, check=False)
        err = proc.stderr + proc.stdout
        assert proc.returncode != 0
        # the dropped column: named with its shard, and the dataset fails
        assert "instruction" in err and "parquet_data/mige_edit/" + mige.name in err
        # the garbage image: one row of 24 (below max_quarantine_fraction) is quarantined, the rest kept
        quarantine = pq.read_table(root / "artifacts/validation/quarantine/scone_single_candidate_base.parquet")
        assert quarantine.column("key").to_pylist() == [bad_key]
        report = json.loads((root / "artifacts/validation/scone_single_candidate_base.json").read_text())
        assert report["success"] is True
        TALLY["corruptions_detected_and_named"] += 2

        from model.batching import examples_from_rows
        from model.data_loader import clear_cache, load_examples

        clear_cache()
        kept = load_examples(data, ["scone_single_candidate_base"], examples_from_rows)
        lost = rows_before - 1 - len(kept)
        TALLY["valid_rows_lost"] += lost
        assert lost == 0
    finally:
        run(["dvc", "checkout", "build_base", "build_mige_edit", "--force"], root, env)
    # the chain mends itself: validation (and the report that shows it) re-run, training does not
    out = run(["scone", "pipeline"], root, env)
    log = out.stdout + out.stderr
    assert "validate_data: running" in log and "train@stage1_step1: up to date" in log
    assert stale_stages(root, env) == set()


def test_concurrent_registers_and_pipelines_leave_no_duplicate(reference):
    root, env, ref_registry, _ = reference
    # two registers on a fresh store (MLflow's schema migration included)
    art = root / "artifacts"
    shutil.move(art / "mlflow.db", art / "mlflow.db.bak")
    shutil.move(art / "mlruns", art / "mlruns.bak")
    procs = [subprocess.Popen(["scone", "register"], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    refused = [err for rc, err in results if rc != 0]
    assert all(rc in (0, 3) for rc, _ in results) and len(refused) <= 1
    for err in refused:
        assert "is being written by pid" in err
        TALLY["concurrent_writers_refused"] += 1
    state = registry_state(root)
    TALLY["duplicate_versions"] += duplicates(state)
    assert state["n_versions"] == len(CHECKPOINTS) and duplicates(state) == 0
    # a second register of the same weights returns the same versions
    run(["scone", "register"], root, env)
    assert registry_state(root) == state

    # a behaviour change in a score formula, run by one pipeline while a second one tries to start: the second
    # is refused, the first re-scores (and only re-scores) and the registry shows the recomputed numbers
    formula = root / "evaluation/results.py"  # com_score, which SconeEval's summary uses
    before = formula.read_text()
    formula.write_text(before.replace("return math.sqrt(pf * sc)", "return 1.0 + math.sqrt(pf * sc)"))
    assert formula.read_text() != before, "the COM formula moved: point this edit at its new home"
    first = subprocess.Popen(["scone", "pipeline"], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (art / ".lock.holder.json").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    second = run(["scone", "pipeline"], root, env, check=False)
    assert second.returncode == 3 and "is being written by pid" in second.stderr, second.stderr[-2000:]
    TALLY["concurrent_writers_refused"] += 1
    log = first.stdout.read()
    assert first.wait(timeout=900) == 0, log[-3000:]
    assert "train@stage1_step1: up to date" in log and "evaluate@stage2_step2: running" in log
    state = registry_state(root)
    TALLY["duplicate_versions"] += duplicates(state)
    assert duplicates(state) == 0 and stale_stages(root, env) == set()
    new_scores = scores(root)
    served = {n: (o, new_scores[n]) for n, ((_, o, _),) in state["versions"].items() if abs(o - new_scores[n]) > 1e-6}
    TALLY["stale_outputs_served"] += len(served)
    assert not served  # every version carries the recomputed Overall
    old_scores = {n: ref_registry["versions"][n][0][1] for n in CHECKPOINTS}
    assert all(new_scores[n] > old_scores[n] for n in CHECKPOINTS)  # every COM one point up


def test_a_moved_checkout_reruns_nothing_and_holds_no_absolute_path(reference, tmp_path_factory):
    root, env, ref_registry, ref_scores = reference
    moved = tmp_path_factory.mktemp("moved") / "checkout"
    shutil.copytree(root, moved, symlinks=True)
    env = {**env, "PREFECT_HOME": str(moved / ".prefect"), "PYTHONPATH": str(moved)}
    assert stale_stages(moved, env) == set()
    out = run(["scone", "pipeline"], moved, env)
    assert ": running (" not in out.stdout + out.stderr
    # MLflow reads its artifacts where the checkout is now, not where it was made
    con = sqlite3.connect(moved / "artifacts/mlflow.db")
    locations = [r[0] for r in con.execute("select artifact_location from experiments")]
    locations += [r[0] for r in con.execute("select source from model_versions")]
    assert locations and not any(str(root) in loc or loc.startswith("/") for loc in locations)
    for f in (moved / "artifacts").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".html", ".md", ".yaml") and "mlruns" not in f.parts:
            assert str(root) not in f.read_text(errors="ignore"), f
    assert registry_state(moved) == registry_state(root)


def test_a_crafted_pickle_in_training_state_is_refused_by_scone_train(reference, tmp_path):
    import pickle

    root, env, _, _ = reference
    marker = tmp_path / "pwned"
    state = root / "artifacts/work/train/stage1_step1/ds_state"
    (state / "step0000002").mkdir(parents=True)
    (state / "latest").write_text("step0000002")

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (state / "step0000002" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"module": Payload()}))
    try:
        out = run(["scone", "train", "--stage", "stage1_step1"], root, env, check=False)
        TALLY["pickles_executed"] += int(marker.exists())
        assert not marker.exists()
        assert out.returncode == 2 and "mp_rank_00_model_states.pt: refused to load" in out.stderr, out.stderr[-2000:]
    finally:
        shutil.rmtree(root / "artifacts/work")
    assert stale_stages(root, env) == set()  # the published checkpoint was never touched


def test_push_to_a_remote_and_a_fresh_clone_that_pulls_reruns_nothing(reference, tmp_path_factory):
    root, env, _, ref_scores = reference
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(["dvc", "remote", "add", "-d", "-f", "storage", str(remote)], root, env)
    run(["dvc", "push"], root, env)
    run(["git", "add", "-A"], root, env)  # dvc.lock and the remote's config travel through git
    run(["git", "commit", "-qm", "pipeline results"], root, env)
    clone = tmp_path_factory.mktemp("pulled") / "checkout"
    run(["git", "clone", "-q", str(root), str(clone)], root.parent, env)
    env = {**env, "PREFECT_HOME": str(clone / ".prefect"), "PYTHONPATH": str(clone)}
    run(["dvc", "pull"], clone, env)
    assert stale_stages(clone, env) == set()
    out = run(["scone", "pipeline"], clone, env)
    assert ": running (" not in out.stdout + out.stderr
    assert scores(clone) == scores(root)
    metrics = run(["dvc", "metrics", "show", "--json"], clone, env).stdout
    assert "sconeeval_overall" in metrics and all(n in metrics for n in CHECKPOINTS)
