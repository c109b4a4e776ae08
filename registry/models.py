"""Checkpoints as MLflow models: each version is a logged model with a pyfunc flavour over the generation pipeline.

`register_checkpoint` logs the checkpoint (a BAGEL release directory: llm/vit configs, the weights, `ae.safetensors`,
tokenizer files, the stage's `config.json` marker and metrics; model.bagel.release) as the `checkpoint`
artifact of an MLflow model from code (`registry/pyfunc_model.py`: nothing pickled), with an explicit signature,
an input example and the sampling settings its scores were measured with as `model_config`; the version is then
created from that logged model (`models:/<model_id>`), so `mlflow.pyfunc.load_model("models:/scone-tiny@champion")`
and `mlflow models serve` load it. Every metric lives on the run (and on the logged model); the version carries only
what a reviewer scans: stage, code and data version, weights md5, the headline scores and the gate's verdict.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from registry import (CANDIDATE_ALIAS, CHAMPION_ALIAS, METRIC_TAG_PREFIX, MICO_OVERALL, MIGE_OVERALL,  # noqa: F401
                      SCONEEVAL_COM, SCONEEVAL_DIS, SCONEEVAL_OVERALL, T2I_PREFIX, TAG_DATA_HASH, TAG_GIT_COMMIT,
                      TAG_GIT_DIRTY, TAG_KIND, TAG_STAGE)
from registry.tracking import Tracker

# The scores a reviewer scans in the registry list; every other metric stays on the run and the logged model.
HEADLINE_METRICS = (SCONEEVAL_OVERALL, SCONEEVAL_COM, SCONEEVAL_DIS, f"{T2I_PREFIX}mean", MICO_OVERALL, MIGE_OVERALL)
CHECKPOINT_ARTIFACT_PATH = "checkpoint"
EVAL_ARTIFACT_PATH = "eval"
LOGGED_MODEL_NAME = "scone-pipeline"
# The architecture files of a BAGEL release directory (model.pipeline.RELEASE_MARKERS; a test keeps them equal).
RELEASE_CONFIGS = ("llm_config.json", "vit_config.json")
# Provenance copied from the run onto the version.
_RUN_TAGS_TO_VERSION = (TAG_STAGE, TAG_KIND, TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_DATA_HASH)
SOURCE_TAGS_FALLBACK = {"mlflow.source.name": "scone register", "mlflow.source.type": "LOCAL"}
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# What `mlflow models serve` with a virtualenv/conda env manager installs; the scone-ops package itself (the
# model code the pyfunc imports) must be installed there as well: it is not on a package index.
_PIP_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pillow", "pydantic")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    source: str
    model_id: str | None = None


def _is(e: MlflowException, code: int) -> bool:
    return e.error_code == ErrorCode.Name(code)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="Scone-style unified model checkpoints (scone-ops)")
    except MlflowException as e:
        if not _is(e, RESOURCE_ALREADY_EXISTS):
            raise


def list_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of `name`, oldest first (empty when the model is not registered yet)."""
    versions = client.search_model_versions(f"name = '{name}'")
    return sorted(versions, key=lambda mv: int(mv.version))


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _is(e, RESOURCE_DOES_NOT_EXIST) or "not found" in str(e).lower():
            return None
        raise


def headline_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    """`metric.<name>` version tags for the headline scores present in `metrics`."""
    return {METRIC_TAG_PREFIX + k: repr(float(metrics[k])) for k in HEADLINE_METRICS if k in metrics}


def version_metrics(client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """The metrics of a version: the latest value of every metric of its run; the headline tags stand in for the
    run when it is gone (deleted, or in another store)."""
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            metrics.update(client.get_run(mv.run_id).data.metrics)
        except MlflowException:
            pass
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX):]] = float(value)
            except ValueError:
                continue
    return metrics


def update_version_metrics(tracker: Tracker, mv: ModelVersion, metrics: Mapping[str, float]) -> None:
    """Recomputed scores of already registered weights: the run (and the version's logged model) get the new values
    as the next point of each metric's history (the UI shows the latest), the headline tags are replaced."""
    client = tracker.client
    if mv.run_id and metrics:
        history = client.get_metric_history(mv.run_id, next(iter(metrics)))
        step = max((m.step for m in history), default=0) + 1
        tracker.log_metrics(mv.run_id, metrics, step=step)
        model_id = version_model_id(mv)
        if model_id:
            log_model_metrics(tracker, mv.run_id, model_id, metrics, step=step)
    for key, value in headline_tags(metrics).items():
        client.set_model_version_tag(mv.name, mv.version, key, value)


def version_model_id(mv: ModelVersion) -> str | None:
    """The logged model behind a version (the SQL store keeps it only as the `models:/<model_id>` source)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    rest = source.removeprefix("models:/")
    return rest if source.startswith("models:/m-") and "/" not in rest else None


def log_model_metrics(tracker: Tracker, run_id: str, model_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Metrics of a logged model (MLflow 3: metrics carry a model_id), recorded through its run."""
    import time

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step, run_id=run_id, model_id=model_id) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        tracker.client.log_batch(run_id, metrics=items[i:i + 1000], synchronous=True)


def _cwd_relative(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (the repo root, where the chain runs), so the
    MLmodel file names no absolute path; otherwise as it is."""
    path = Path(path).absolute()
    try:
        return path.relative_to(Path.cwd().absolute()).as_posix()
    except ValueError:
        return str(path)


def missing_release_parts(checkpoint_dir: Path) -> list[str]:
    """What `checkpoint_dir` lacks of a release directory (the architecture files, safetensors weights); [] when
    it has them. Checked before anything is logged, so a folder the pipeline cannot load never becomes a version.
    By file names only: the report step imports this module, and model code here would make every model change
    re-run the report (tests/test_freshness_deps.py); which weights file is the model is model.bagel.release's
    to decide when the pipeline loads it."""
    missing = [name for name in RELEASE_CONFIGS if not (checkpoint_dir / name).is_file()]
    if not any(checkpoint_dir.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    return missing


@contextmanager
def _model_files(checkpoint_dir: Path, staging: Path) -> Iterator[Path]:
    """A folder with the checkpoint's top-level files: the checkpoint itself when it has no subfolders, else hard
    links (copies across file systems) in a fresh folder under `staging`. Subfolders (resumable optimizer state) are
    training internals, not the model. MLflow records the folder in the MLmodel file (as `uri` of the artifact), so
    it is given relative to the working directory where possible."""
    if not any(p.is_dir() for p in checkpoint_dir.iterdir()):
        yield checkpoint_dir
        return
    Path(staging).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="model-", dir=staging))
    try:
        out = tmp / CHECKPOINT_ARTIFACT_PATH
        out.mkdir()
        for f in sorted(checkpoint_dir.iterdir()):
            if f.is_file():
                try:
                    os.link(f, out / f.name)
                except OSError:
                    shutil.copy2(f, out / f.name)
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _fluent(tracker: Tracker, run_id: str) -> Iterator[None]:
    """`mlflow.pyfunc.log_model` and the registry's `models:/<model_id>` resolution go through MLflow's global
    tracking URI and active run: point both at this tracker's store and run for the duration, then put back what
    was there. `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI (which `resolve_tracking_uri` obeys), so
    the environment is restored too: a later Tracker of another store must not inherit this one."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    prev_env = {k: os.environ.get(k) for k in env_keys}
    prev_tracking, prev_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(tracker.tracking_uri)
    mlflow.set_registry_uri(tracker.tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            yield
    finally:
        mlflow.set_tracking_uri(prev_tracking)
        registry_utils._registry_uri = prev_registry
        for k, v in prev_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    import mlflow

    reqs = [f"mlflow=={mlflow.__version__}"]
    for name in _PIP_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_pipeline_model(tracker: Tracker, run_id: str, checkpoint_dir: Path, sampling: Mapping[str, Any],
                       staging: Path | None = None, tags: Mapping[str, str] | None = None,
                       pipeline: Mapping[str, Any] | None = None):
    """Log `checkpoint_dir` as an MLflow model (pyfunc from code) to `run_id`; returns MLflow's ModelInfo.

    Call inside `_fluent` (MLflow logs models through its global tracking URI and active run). Run metrics at step 0
    (the evaluation scores) become the logged model's metrics."""
    import mlflow

    from registry import pyfunc_io

    settings = pyfunc_io.sampling_settings(sampling)
    staging = Path(staging) if staging is not None else tracker.root / "artifacts" / ".staging"
    with _model_files(Path(checkpoint_dir), staging) as files:
        return mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME,
            # a model from code: MLflow copies the file into the model and runs it at load time; nothing is pickled.
            # (MLflow records the file's resolved path as `model_code_path` in MLmodel; loading uses only its name.)
            python_model=str(PYFUNC_CODE),
            artifacts={CHECKPOINT_ARTIFACT_PATH: _cwd_relative(files)},
            # the pipeline's settings beside the sampling ones: it generates as the chain evaluated it
            model_config={**settings, **({pyfunc_io.PIPELINE_KEY: dict(pipeline)} if pipeline else {})},
            signature=pyfunc_io.signature(settings),
            input_example=pyfunc_io.input_example(int((pipeline or {}).get("image_size") or
                                                      pyfunc_io.image_size(files))),
            pip_requirements=pip_requirements(),
            params={f"sampling.{k}": v for k, v in settings.items()},
            tags=dict(tags or {}),
        )


def register_checkpoint(
    tracker: Tracker,
    run_id: str,
    checkpoint_dir: Path,
    model_name: str,
    metrics: Mapping[str, float],
    description: str = "",
    eval_summary: Path | None = None,
    extra_tags: Mapping[str, str] | None = None,
    sampling: Mapping[str, Any] | None = None,
    staging: Path | None = None,
    pipeline: Mapping[str, Any] | None = None,
) -> RegisteredVersion:
    """Log the checkpoint as an MLflow model of `run_id`, create a version from that model, point `candidate` at it.

    Metrics missing from the run are logged there first (step 0, so they become the logged model's metrics too).
    The version's tags, set in its creation (a kill right after it still finds them): the run's stage, kind, code
    and data version, the headline scores and `extra_tags`. `sampling` holds the pipeline's sampling settings
    (steps, cfg_text, cfg_image, bridge, seed: `registry.pyfunc_io.SAMPLING_KEYS`); missing ones take the
    evaluation defaults. `staging` is where the model files are gathered (default `<root>/artifacts/.staging`).
    """
    from registry.pyfunc_io import DEFAULT_SAMPLING, SAMPLING_KEYS

    checkpoint_dir = Path(checkpoint_dir)
    missing = missing_release_parts(checkpoint_dir)
    if missing:
        raise FileNotFoundError(
            f"checkpoint {checkpoint_dir} lacks {', '.join(missing)}; register a finished stage's checkpoint folder"
        )
    settings = {**DEFAULT_SAMPLING, **{k: v for k, v in (sampling or {}).items() if k in SAMPLING_KEYS}}
    if settings["bridge"] and not (pipeline or {}).get("bridge"):
        # a release stores no bridge settings: such a version would fail every request (MLflow only warns when
        # its input example fails at logging)
        raise ValueError("sampling with bridge=True needs the pipeline's bridge settings: pass "
                         "pipeline=model.pipeline.pipeline_settings(params.model)")
    client = tracker.client
    run = client.get_run(run_id)
    fresh = {k: v for k, v in metrics.items() if k not in run.data.metrics}
    if fresh:
        tracker.log_metrics(run_id, fresh)
    if eval_summary is not None:
        client.log_artifact(run_id, str(eval_summary), EVAL_ARTIFACT_PATH)

    tags = {k: run.data.tags[k] for k in _RUN_TAGS_TO_VERSION if k in run.data.tags}
    tags.update(headline_tags(metrics))
    tags.update(extra_tags or {})
    # the logged model's source: the run's (MLflow would name sys.argv[0], an absolute path)
    source_tags = {**SOURCE_TAGS_FALLBACK, **{k: v for k, v in run.data.tags.items() if k.startswith("mlflow.source.")}}
    ensure_registered_model(client, model_name)
    with _fluent(tracker, run_id):
        info = log_pipeline_model(tracker, run_id, checkpoint_dir, settings, staging, tags=source_tags,
                                  pipeline=pipeline)
        source = f"models:/{info.model_id}"
        mv = client.create_model_version(model_name, source, run_id=run_id, tags=tags,
                                         description=description or None, model_id=info.model_id)
    client.set_registered_model_alias(model_name, CANDIDATE_ALIAS, mv.version)
    return RegisteredVersion(model_name, str(mv.version), run_id, source, info.model_id)

