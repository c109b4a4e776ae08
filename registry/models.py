"""Checkpoints as MLflow model versions: the files, their metrics and provenance, and the two aliases.

A version's source is the plain checkpoint directory logged under the run's artifacts (`model.safetensors`,
`config.json`, tokenizer files): `SconeModel.from_pretrained` loads it as is, so no MLmodel flavour is needed.
Metrics are copied onto the version as `metric.<name>` tags so the registry alone answers "how good is v3"
even for versions whose run lives elsewhere.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from registry.tracking import TAG_DATA_HASH, TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_KIND, TAG_STAGE, Tracker

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
METRIC_TAG_PREFIX = "metric."
TAG_EVAL_SUMMARY = "scone.eval_summary"
CHECKPOINT_ARTIFACT_PATH = "checkpoint"
REQUIRED_CHECKPOINT_FILES = ("config.json", "model.safetensors")
# Provenance copied from the run onto the version.
_RUN_TAGS_TO_VERSION = (TAG_STAGE, TAG_KIND, TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_DATA_HASH)


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    source: str


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


def version_metrics(client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """The metrics of a version: its `metric.*` tags, completed by the latest values of its run's metrics."""
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            metrics.update(client.get_run(mv.run_id).data.metrics)
        except MlflowException:
            pass  # run deleted or in another store: the tags still carry the registered metrics
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX):]] = float(value)
            except ValueError:
                continue
    return metrics


def update_version_metrics(tracker: Tracker, mv: ModelVersion, metrics: Mapping[str, float]) -> None:
    """Recomputed scores of already registered weights: the run gets the new values as the next point of each
    metric's history (the UI shows the latest), the version's metric tags are replaced."""
    client = tracker.client
    if mv.run_id:
        history = client.get_metric_history(mv.run_id, next(iter(metrics))) if metrics else []
        tracker.log_metrics(mv.run_id, metrics, step=max((m.step for m in history), default=0) + 1)
    for key, value in metrics.items():
        client.set_model_version_tag(mv.name, mv.version, METRIC_TAG_PREFIX + key, repr(float(value)))


def register_checkpoint(
    tracker: Tracker,
    run_id: str,
    checkpoint_dir: Path,
    model_name: str,
    metrics: Mapping[str, float],
    description: str = "",
    eval_summary: Path | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> RegisteredVersion:
    """Log the checkpoint files to `run_id`, create a model version from them and point `candidate` at it.

    Only the top-level files of `checkpoint_dir` are logged: subdirectories (resumable optimizer state) are
    training internals, not the model. Metrics missing from the run are logged there too, and every metric becomes
    a version tag; the run's stage, kind, git commit and data hash are copied onto the version.
    """
    checkpoint_dir = Path(checkpoint_dir)
    missing = [f for f in REQUIRED_CHECKPOINT_FILES if not (checkpoint_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {checkpoint_dir} lacks {', '.join(missing)}; save it with SconeModel.save_pretrained first"
        )
    client = tracker.client
    run = client.get_run(run_id)
    for f in sorted(checkpoint_dir.iterdir()):
        if f.is_file():
            client.log_artifact(run_id, str(f), CHECKPOINT_ARTIFACT_PATH)
    fresh = {k: v for k, v in metrics.items() if k not in run.data.metrics}
    if fresh:
        tracker.log_metrics(run_id, fresh)

    tags = {k: run.data.tags[k] for k in _RUN_TAGS_TO_VERSION if k in run.data.tags}
    tags.update({METRIC_TAG_PREFIX + k: repr(float(v)) for k, v in metrics.items()})
    if eval_summary is not None:
        client.log_artifact(run_id, str(eval_summary), "eval")
        tags[TAG_EVAL_SUMMARY] = f"{run.info.artifact_uri}/eval/{Path(eval_summary).name}"

    tags.update(extra_tags or {})
    ensure_registered_model(client, model_name)
    source = f"{run.info.artifact_uri}/{CHECKPOINT_ARTIFACT_PATH}"
    mv = client.create_model_version(model_name, source, run_id=run_id, tags=tags, description=description or None)
    client.set_registered_model_alias(model_name, CANDIDATE_ALIAS, mv.version)
    return RegisteredVersion(model_name, str(mv.version), run_id, source)
