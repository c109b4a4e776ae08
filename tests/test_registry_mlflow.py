"""Tracking, registration and the gate against a real MLflow SQLite store (one per module: migrations cost seconds)."""
import json
from pathlib import Path

import pytest

from registry import SCONEEVAL_COM, SCONEEVAL_DIS, SCONEEVAL_OVERALL
from registry.config import GateConfig, RegistryConfig
from registry.gate import TAG_CHAMPION_BEFORE, TAG_DECISION, TAG_REASONS, apply_gate
from registry.models import (
    CANDIDATE_ALIAS, CHAMPION_ALIAS, register_checkpoint, version_by_alias, version_metrics, version_model_id,
)
from registry.tracking import (
    TAG_DATA_HASH, TAG_KIND, TAG_STAGE, Tracker, dvc_data_hash, flatten_params, resolve_tracking_uri,
)
from bagel_release import copy_release
from model.bagel.release import find_weights


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    return Tracker(RegistryConfig(tracking_uri="sqlite:///mlflow.db", experiment="test"), root)


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def make_checkpoint(release: Path, path: Path, seed: int = 0) -> Path:
    """A real (tiny) checkpoint, a release directory as a stage writes it (the tiny release, its velocity head
    drawn from `seed`): registration logs it as a pyfunc model and checks its input example on it."""
    from release_edit import VELOCITY_HEAD, copy_with_weights, random_normal

    copy_with_weights(release, path, {VELOCITY_HEAD: random_normal(0.1, seed)})
    (path / "global_step10").mkdir(exist_ok=True)  # resumable state: must not be registered
    (path / "global_step10" / "optim.pt").write_bytes(b"x" * 10)
    return path


FAST = {"steps": 2, "cfg_text": 1.0, "cfg_image": 1.0}  # the input example is generated once at registration


def scores(com, dis):
    return {SCONEEVAL_COM: com, SCONEEVAL_DIS: dis, SCONEEVAL_OVERALL: (com + dis) / 2}


def test_store_and_artifacts_live_under_root(tracker):
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert tracker.tracking_uri == f"sqlite:///{tracker.root / 'mlflow.db'}"
    assert (tracker.root / "mlflow.db").exists()
    assert exp.artifact_location == (tracker.root / "artifacts" / "mlruns").as_uri()


def test_run_tags_params_and_status(tracker):
    with tracker.run("srum_round1", data_hash="abc123") as run_id:
        flat = tracker.log_params(run_id, {"train": {"lr": 1e-3, "betas": [0.9, 0.95]}, "note": "x" * 7000,
                                           **{f"k{i}": i for i in range(150)}})  # > 100 params: two batches
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_STAGE] == "srum_round1" and run.data.tags[TAG_KIND] == "srum"
    assert run.data.tags[TAG_DATA_HASH] == "abc123"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.betas"] == "[0.9, 0.95]"
    assert len(run.data.params) == 153 == len(flat)
    assert 0 < len(run.data.params["note"]) < 7000

    with pytest.raises(RuntimeError):
        with tracker.run("stage_fails") as failed:
            raise RuntimeError("boom")
    assert tracker.client.get_run(failed).info.status == "FAILED"


def test_metrics_file_becomes_metric_history(tracker, tmp_path):
    lines = [{"step": s, "loss": 1.0 / s, "fm_loss": 0.5 / s, "lr": 1e-3, "phase": "train"} for s in range(1, 1201)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    run_id = tracker.start_run("stage1_step1")
    n = tracker.log_metrics_file(run_id, path)
    assert n == 1200 * 3  # three numeric fields per line; the string field is ignored; > 1000 points: chunks
    hist = sorted(tracker.client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(1, 1201))
    assert hist[3].value == pytest.approx(0.25)
    assert tracker.client.get_metric_history(run_id, "phase") == []

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1}\n{"loss": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'step'"):
        tracker.log_metrics_file(run_id, bad)
    with pytest.raises(TypeError, match="not numeric: name"):
        tracker.log_metrics(run_id, {"name": "x"})


def test_register_then_gate_promote_reject_promote(tracker, bagel_release, tmp_path):
    model, gate, client = "gate-seq", GateConfig(min_overall=0.5, max_regression=0.0), tracker.client
    versions = []
    for i, (name, s) in enumerate([("stage1_step1", scores(5.0, 7.0)), ("stage1_step2", scores(4.0, 6.0)),
                                   ("stage2_step1", scores(6.0, 8.0))]):
        ckpt = make_checkpoint(bagel_release, tmp_path / name, seed=i)
        run_id = tracker.start_run(name, data_hash=f"data{i}")
        rv = register_checkpoint(tracker, run_id, ckpt, model, s, description=f"{name} checkpoint", sampling=FAST)
        tracker.end_run(run_id)
        versions.append(rv)
        assert str(version_by_alias(client, model, CANDIDATE_ALIAS).version) == rv.version  # newest is candidate

    v1, v2, v3 = versions
    assert [v.version for v in versions] == ["1", "2", "3"]
    # the version is a logged MLflow model whose `checkpoint` artifact holds the model files, no optimizer state
    mv1 = client.get_model_version(model, "1")
    assert v1.source == mv1.source == f"models:/{v1.model_id}" and version_model_id(mv1) == v1.model_id
    src = Path(client.get_logged_model(v1.model_id).artifact_location.removeprefix("file://"))
    assert (src / "MLmodel").is_file()
    assert sorted(p.name for p in (src / "artifacts" / "checkpoint").iterdir()) == [
        "ae.safetensors", "ae_params.json", "config.json", "ema.safetensors", "llm_config.json", "merges.txt",
        "tokenizer.json", "tokenizer_config.json", "vit_config.json", "vocab.json"]
    for weights in find_weights(tmp_path / "stage1_step1").files:  # the version's weights are stage1_step1's
        assert (src / "artifacts/checkpoint" / weights.name).read_bytes() == weights.read_bytes()
    assert mv1.tags[TAG_STAGE] == "stage1_step1" and mv1.tags[TAG_DATA_HASH] == "data0"
    assert version_metrics(client, mv1)[SCONEEVAL_OVERALL] == 6.0
    assert client.get_run(v1.run_id).data.metrics[SCONEEVAL_OVERALL] == 6.0  # logged on the run too

    d1 = apply_gate(client, model, v1.version, gate)
    assert d1.promote and d1.champion_before is None
    assert str(version_by_alias(client, model, CHAMPION_ALIAS).version) == "1"

    d2 = apply_gate(client, model, v2.version, gate)  # overall 5.0 < champion 6.0
    assert not d2.promote and d2.champion_after == "1"
    assert str(version_by_alias(client, model, CHAMPION_ALIAS).version) == "1"
    mv2 = client.get_model_version(model, "2")
    assert mv2.tags[TAG_DECISION] == "rejected" and mv2.tags[TAG_CHAMPION_BEFORE] == "1"
    assert any(r.startswith("fail: regression") for r in json.loads(mv2.tags[TAG_REASONS]))
    assert mv2.description.startswith("stage1_step2 checkpoint\n\nGate: rejected")

    d3 = apply_gate(client, model, v3.version, gate)
    assert d3.promote and d3.champion_before == "1"
    assert str(version_by_alias(client, model, CHAMPION_ALIAS).version) == "3"
    # re-gating replaces the verdict in the description rather than appending a second one
    apply_gate(client, model, v3.version, gate)
    assert client.get_model_version(model, "3").description.count("Gate: ") == 1


def test_threshold_failure_rejects_first_candidate(tracker, bagel_release, tmp_path):
    model, client = "gate-threshold", tracker.client
    run_id = tracker.start_run("stage1_step1")
    rv = register_checkpoint(tracker, run_id, make_checkpoint(bagel_release, tmp_path / "c"), model, scores(1.0, 9.0),
                             sampling=FAST)
    d = apply_gate(client, model, rv.version, GateConfig(min_overall=0.5, min_com=2.0))
    assert not d.promote
    assert version_by_alias(client, model, CHAMPION_ALIAS) is None
    reasons = json.loads(client.get_model_version(model, rv.version).tags[TAG_REASONS])
    assert [r for r in reasons if r.startswith("fail")] == ["fail: sconeeval.com 1.0000 < min_com 2"]


def test_register_refuses_incomplete_checkpoint(tracker, bagel_release, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    run_id = tracker.start_run("stage1_step1")
    with pytest.raises(FileNotFoundError, match=r"lacks llm_config.json, vit_config.json, \*.safetensors weights"):
        register_checkpoint(tracker, run_id, tmp_path / "ck", "incomplete", {})
    # a release missing an architecture file is no release the pipeline can load
    partial = copy_release(bagel_release, tmp_path / "partial")
    (partial / "vit_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks vit_config.json;"):
        register_checkpoint(tracker, run_id, partial, "incomplete", {})
    assert tracker.client.search_registered_models(filter_string="name='incomplete'") == []


def test_the_registry_knows_a_release_by_the_pipelines_markers():
    from model.pipeline import RELEASE_MARKERS
    from registry.models import RELEASE_CONFIGS

    assert RELEASE_CONFIGS == RELEASE_MARKERS


def test_register_refuses_bridge_sampling_without_the_bridge_settings(tracker, bagel_release, tmp_path):
    from model.config import ModelConfig
    from model.pipeline import pipeline_settings

    ckpt = make_checkpoint(bagel_release, tmp_path / "c")
    run_id = tracker.start_run("stage2_step1")
    with pytest.raises(ValueError, match="bridge=True needs the pipeline's bridge settings"):
        register_checkpoint(tracker, run_id, ckpt, "bridged", {}, sampling={**FAST, "bridge": True})
    assert tracker.client.search_registered_models(filter_string="name='bridged'") == []
    rv = register_checkpoint(tracker, run_id, ckpt, "bridged", {}, sampling={**FAST, "bridge": True},
                             pipeline=pipeline_settings(ModelConfig()))
    assert rv.version == "1"


def test_dvc_data_hash_from_files_and_lock(tmp_path):
    data = tmp_path / "artifacts" / "data" / "parquet_data" / "base"
    data.mkdir(parents=True)
    (data / "part-00000.parquet").write_bytes(b"abc")
    first = dvc_data_hash(["artifacts/data/parquet_data/base"], tmp_path)
    assert first == dvc_data_hash(["artifacts/data/parquet_data/base/"], tmp_path)  # stable, path-normalised
    (data / "part-00000.parquet").write_bytes(b"abd")
    assert dvc_data_hash(["artifacts/data/parquet_data/base"], tmp_path) != first  # content-sensitive

    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  build_base:\n    cmd: scone data build base\n    outs:\n"
        "    - path: artifacts/data/parquet_data/base\n      hash: md5\n      md5: 0123abcd.dir\n"
    )
    from_lock = dvc_data_hash(["artifacts/data/parquet_data/base"], tmp_path)
    import hashlib
    assert from_lock == hashlib.md5(b"artifacts/data/parquet_data/base:0123abcd.dir").hexdigest()
    with pytest.raises(FileNotFoundError, match="build the dataset first"):
        dvc_data_hash(["artifacts/data/missing"], tmp_path)


def test_flatten_and_uri_resolution(tmp_path, monkeypatch):
    assert flatten_params({"a": {"b": {"c": 1}}, "d": None, "e": {}}) == {"a.b.c": "1", "d": "null", "e": "{}"}
    assert resolve_tracking_uri("sqlite:///artifacts/mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/artifacts/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri("sqlite:///artifacts/mlflow.db", tmp_path) == "http://tracking:5000"
