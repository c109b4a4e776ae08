"""Registered checkpoints are MLflow models: `models:/<name>@champion` loads as a pyfunc and generates images,
`mlflow models serve` serves it; the version carries a short list of tags, the run every metric; the store holds no
absolute path and the model's artifacts nothing pickled."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from chain_clone import free_port, stop_group

from model.config import BridgeConfig, ModelConfig
from model.pipeline import pipeline_settings
from registry import SCONEEVAL_COM, SCONEEVAL_DIS, SCONEEVAL_OVERALL
from registry.config import GateConfig, RegistryConfig
from registry.gate import apply_gate
from registry.models import register_checkpoint, version_model_id
from registry.pyfunc_io import decode_png, encode_png, input_example
from registry.tracking import Tracker, source_tags

MODEL = "scone-tiny"
SAMPLING = {"steps": 3, "cfg_text": 2.0, "cfg_image": 1.5, "bridge": True, "seed": 5}
# what the register step passes: the pipeline's settings from params.model, the bridge's among them
PIPELINE = pipeline_settings(ModelConfig(bridge=BridgeConfig(early_layer=0, apply_until=1, tau=0.0)))
METRICS = {SCONEEVAL_COM: 4.0, SCONEEVAL_DIS: 6.0, SCONEEVAL_OVERALL: 5.0, "t2i.mean": 0.25, "t2i.color": 0.5,
           "sconeeval.composition_single.com": 4.5, "sconeeval.com_std": 0.1}


def _tiny_checkpoint(release: Path, path: Path) -> Path:
    """A stage's checkpoint folder: the tiny release (its velocity head random: images that depend on the model,
    not only on the noise), the stage's metrics and resumable training state beside it."""
    from release_edit import VELOCITY_HEAD, copy_with_weights, random_normal

    copy_with_weights(release, path, {VELOCITY_HEAD: random_normal(0.2, 0)})
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    (path / "ds_state").mkdir()  # training internals: not part of the model
    (path / "ds_state" / "optim.pt").write_bytes(b"x")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, bagel_release):
    """A repo root (the working directory, as in the chain) with one registered, promoted tiny checkpoint."""
    import mlflow

    root = tmp_path_factory.mktemp("repo").resolve()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        data = root / "artifacts/data/parquet_data/base"
        data.mkdir(parents=True)
        (data / "part-00000.parquet").write_bytes(b"rows")
        ckpt = _tiny_checkpoint(bagel_release, root / "artifacts/checkpoints/stage1_step1")
        tracker = Tracker(RegistryConfig(tracking_uri="sqlite:///artifacts/mlflow.db", model_name=MODEL), root)
        with tracker.run("stage1_step1", data_hash="d" * 32, tags=source_tags(root, "scone register")) as run_id:
            digests = tracker.log_datasets(run_id, ["artifacts/data/parquet_data/base"])
            tracker.log_metrics_file(run_id, ckpt / "metrics.jsonl")
            rv = register_checkpoint(tracker, run_id, ckpt, MODEL, METRICS, description="stage1_step1",
                                     extra_tags={"checkpoint.weights_md5": "w" * 32}, sampling=SAMPLING,
                                     pipeline=PIPELINE)
        decision = apply_gate(tracker.client, MODEL, rv.version, GateConfig(min_overall=0.5))
        assert decision.promote
        # registration leaves MLflow's global store as it found it (unset)
        assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_registry_uri() != tracker.tracking_uri
        mp.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)  # where `models:/` resolves, undone at the end
        yield {"root": root, "tracker": tracker, "rv": rv, "digests": digests}


def _request() -> pd.DataFrame:
    ref = decode_png(input_example(32)["reference_images"][0][0])
    return pd.DataFrame({"instruction": ["put the red square on the beach", "a blue circle"],
                         "reference_images": [[encode_png(ref), encode_png(ref[::-1])], []]})


def test_champion_loads_as_pyfunc_and_generates(store):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert model.metadata.get_model_info().signature.params.to_dict()[0]["default"] == 3  # steps, from model_config
    out = model.predict(_request())
    assert list(out.columns) == ["image"] and len(out) == 2
    images = [decode_png(b) for b in out["image"]]
    assert all(img.shape == (32, 32, 3) and img.dtype.name == "uint8" for img in images)
    assert images[0].std() > 0
    again = model.predict(_request())
    assert list(again["image"]) == list(out["image"])  # the version's seed: reproducible
    other = model.predict(_request(), params={"seed": 6, "steps": 2})
    assert list(other["image"]) != list(out["image"])


def test_version_tags_are_the_short_list_and_metrics_live_on_the_run(store):
    client, rv = store["tracker"].client, store["rv"]
    mv = client.get_model_version(MODEL, rv.version)
    assert set(mv.tags) == {
        "scone.stage", "scone.kind", "scone.git_commit", "scone.git_dirty", "scone.data_hash",
        "checkpoint.weights_md5", "metric.sconeeval.overall", "metric.sconeeval.com", "metric.sconeeval.dis",
        "metric.t2i.mean", "gate.decision", "gate.reasons", "gate.champion_before", "gate.thresholds",
    }
    assert float(mv.tags["metric.sconeeval.overall"]) == 5.0
    run = client.get_run(rv.run_id)
    assert {k: run.data.metrics[k] for k in METRICS} == METRICS  # every metric on the run
    assert run.data.metrics["loss"] == pytest.approx(0.2)
    logged = client.get_logged_model(version_model_id(mv))
    assert {m.key for m in logged.metrics} >= set(METRICS)  # and on the logged model
    assert logged.source_run_id == rv.run_id and logged.params["sampling.steps"] == "3"
    assert run.data.tags["mlflow.source.name"] == "scone register" and run.data.tags["mlflow.source.type"] == "LOCAL"
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == list(store["digests"].items())
    assert json.loads(inputs[0].dataset.source) == {"uri": "artifacts/data/parquet_data/base"}


def test_store_and_model_hold_no_absolute_path_and_nothing_pickled(store):
    root, rv = store["root"], store["rv"]
    con = sqlite3.connect(root / "artifacts/mlflow.db")
    source, location = con.execute("select source, storage_location from model_versions").fetchone()
    assert source == rv.source and source.startswith("models:/m-")
    assert location.startswith("artifacts/mlruns/")
    for (table,) in con.execute("select name from sqlite_master where type='table'").fetchall():
        for row in con.execute(f"select * from {table}").fetchall():
            assert not any(isinstance(v, str) and (v.startswith("/") or "file://" in v or str(root) in v
                                                   or sys.prefix in v) for v in row), (table, row)
    model_dir = root / location
    mlmodel = (model_dir / "MLmodel").read_text()
    # the checkpoint is named relative to the root; the one absolute path is MLflow's own record of where the code
    # file came from (`model_code_path`, resolved by MLflow; loading uses only the file's name inside the model)
    absolute = [line.strip() for line in mlmodel.splitlines() if ": /" in line]
    assert [line.split(":")[0] for line in absolute] == ["model_code_path"], absolute
    assert "uri: artifacts/.staging/model-" in mlmodel  # the checkpoint's files, without its ds_state folder
    assert not list((root / "artifacts/.staging").iterdir())  # and gathered only for the logging
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert "pyfunc_model.py" in files and "MLmodel" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert "python_model.pkl" not in files
    assert sorted(f for f in files if f.startswith("artifacts/")) == [
        f"artifacts/checkpoint/{n}" for n in ("ae.safetensors", "ae_params.json", "config.json", "ema.safetensors",
                                              "llm_config.json", "merges.txt", "metrics.jsonl", "tokenizer.json",
                                              "tokenizer_config.json", "vit_config.json", "vocab.json")]


@pytest.mark.slow
def test_mlflow_models_serve_answers_an_invocation(store):
    import httpx

    root, tracker, rv = store["root"], store["tracker"], store["rv"]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.tracking_uri, "OMP_NUM_THREADS": "1"}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "models", "serve", "-m", f"models:/{MODEL}/{rv.version}",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no /ping after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        body = {"dataframe_split": _request().to_dict(orient="split", index=False), "params": {"steps": 2}}
        resp = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        predictions = resp.json()["predictions"]
        assert len(predictions) == 2
        assert decode_png(predictions[0]["image"]).shape == (32, 32, 3)
    finally:
        stop_group(proc)
