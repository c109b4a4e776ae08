"""MLflow tracking for the chain: one run per checkpoint, with params, metric histories and artifacts.

The embedded default is a SQLite store at `artifacts/mlflow.db` with run artifacts under `artifacts/mlruns`; at
scale `MLFLOW_TRACKING_URI` points at a tracking server and nothing here changes. MLflow migrates a fresh SQLite
schema on first use (seconds); MLflow caches the store per URI, so a process pays that once whatever the number
of `Tracker` objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from data.formats.jsonl import iter_jsonl
# the run tags and the store's location are the registry's public vocabulary (registry/__init__.py), re-exported
from registry import (RUN_KINDS, TAG_DATA_HASH, TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_KIND, TAG_STAGE,  # noqa: F401
                      resolve_tracking_uri, sqlite_path)
from registry.config import RegistryConfig


def relative_store_locations(tracking_uri: str, cwd: Path | None = None) -> int:
    """Make the experiments' artifact locations of a SQLite store relative to the working directory.

    MLflow stores absolute paths, so a moved or cloned checkout would keep writing into the old place. Runs,
    logged artifacts and model-version sources derive from the experiment's location, so relative locations make
    the whole embedded store relocatable (MLflow resolves them against the working directory: the repo root, where
    every command of the chain runs). Locations outside `cwd` stay as they are. Returns how many were changed."""
    import sqlite3

    db = sqlite_path(tracking_uri)
    if db is None or not db.exists():
        return 0
    cwd = Path(cwd or Path.cwd()).resolve()
    changed = 0
    with sqlite3.connect(db) as con:
        for exp_id, location in con.execute("select experiment_id, artifact_location from experiments").fetchall():
            path = Path(location.removeprefix("file://")) if location else None
            if path is None or not path.is_absolute() or not path.is_relative_to(cwd):
                continue
            con.execute("update experiments set artifact_location = ? where experiment_id = ?",
                        (path.relative_to(cwd).as_posix(), exp_id))
            changed += 1
    return changed


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


@dataclass(frozen=True)
class CodeVersion:
    commit: str  # short hash, or "unknown" outside a git checkout / before the first commit
    dirty: bool


def git_commit(root: Path = Path(".")) -> CodeVersion:
    """The code version of `root`, read-only (GIT_OPTIONAL_LOCKS=0 keeps `git status` from touching the index)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, env=env, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return CodeVersion("unknown", dirty=git("rev-parse", "--git-dir") is not None)
    status = git("status", "--porcelain", "--untracked-files=no")
    return CodeVersion(commit, dirty=bool(status))


def source_tags(root: Path = Path("."), entry_point: str = "scone") -> dict[str, str]:
    """MLflow's standard source tags of a run: the entry point (a command, never a path), LOCAL, the full commit."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    tags = {MLFLOW_SOURCE_NAME: entry_point, MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL)}
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        if out.returncode == 0 and out.stdout.strip():
            tags[MLFLOW_GIT_COMMIT] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


def file_md5(path: Path) -> str:
    """md5 of a file, read in 1 MiB blocks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lock_outs(root: Path) -> dict[str, str]:
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    tree = yaml.safe_load(lock.read_text()) or {}
    outs = {}
    for stage in (tree.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if "path" in out and "md5" in out:
                outs[os.path.normpath(out["path"])] = out["md5"]
    return outs


def dvc_data_hash(paths: list[str | Path], root: Path = Path(".")) -> str:
    """One md5 naming the version of the data under `paths` (relative to `root`, the DVC project).

    Each path takes the md5 that `dvc.lock` records for it (a `.dir` hash for directories) when a stage out covers
    it, so the value matches `dvc status` / `dvc diff`. Paths DVC does not track yet get a content md5 instead: over
    every file below them in sorted relative-path order, hashing each path together with its file md5 (stable
    across machines, sensitive to renames). The result is the md5 of the sorted `path:md5` lines.
    """
    root = Path(root)
    outs = _lock_outs(root)
    lines = []
    for p in paths:
        rel = os.path.normpath(os.path.relpath(Path(root, p), root))
        digest = outs.get(rel)
        if digest is None:
            # an out that contains this path (dvc tracks a parent dir) identifies it too
            parent = next((o for o in outs if rel.startswith(o + os.sep)), None)
            digest = f"{outs[parent]}:{rel}" if parent else None
        if digest is None:
            target = root / rel
            if not target.exists():
                raise FileNotFoundError(f"data path {target} does not exist and dvc.lock has no entry for it; build the dataset first (scone data build)")
            files = [target] if target.is_file() else sorted(f for f in target.rglob("*") if f.is_file())
            h = hashlib.md5()
            for f in files:
                h.update(f"{f.relative_to(target).as_posix()}\0{file_md5(f)}\n".encode())
            digest = h.hexdigest()
        lines.append(f"{Path(rel).as_posix()}:{digest}")
    return hashlib.md5("\n".join(sorted(lines)).encode()).hexdigest()


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings (or pydantic models) → dotted keys with string values cut to MLflow's length limit."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name + "."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text[:MAX_PARAM_VAL_LENGTH]
    return flat


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Tracker:
    """The chain's MLflow experiment: runs per checkpoint, params, metric histories, artifacts."""

    def __init__(self, cfg: RegistryConfig, root: Path = Path(".")):
        self.cfg = cfg
        self.root = Path(root).resolve()
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri, self.root)
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._experiment_id: str | None = None

    @property
    def artifact_location(self) -> str | None:
        if _is_remote(self.tracking_uri):
            return None  # the server decides (artifact proxy / object store)
        path = Path(self.cfg.artifact_location)
        return (path if path.is_absolute() else self.root / path).as_uri()

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                self._experiment_id = self.client.create_experiment(
                    self.cfg.experiment, artifact_location=self.artifact_location
                )
                relative_store_locations(self.tracking_uri)
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def start_run(self, name: str, kind: str | None = None, data_hash: str | None = None,
                  tags: Mapping[str, str] | None = None) -> str:
        """A run for checkpoint `name` (a stage, or `srum_roundK`), tagged with its kind, code and data version."""
        kind = kind or ("srum" if name.startswith("srum") else "stage")
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind {kind!r} is not one of {RUN_KINDS}")
        code = git_commit(self.root)
        all_tags = {TAG_STAGE: name, TAG_KIND: kind, TAG_GIT_COMMIT: code.commit, TAG_GIT_DIRTY: str(code.dirty).lower()}
        if data_hash:
            all_tags[TAG_DATA_HASH] = data_hash
        all_tags.update(tags or {})
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def existing_run(self, run_id: str | None) -> str | None:
        """`run_id` when this store holds it (a clone's fresh store does not hold the original's runs)."""
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.run_id
        except MlflowException:
            return None

    def live_destination(self, run_id: str) -> dict:
        """Where training processes log a run's metrics: the store as configured (a relative SQLite path resolves
        in the working directory the ranks share), so nothing absolute lands in the run config."""
        return {"tracking_uri": os.environ.get("MLFLOW_TRACKING_URI") or self.cfg.tracking_uri, "run_id": run_id}

    @contextmanager
    def continue_run(self, run_id: str | None, name: str, kind: str | None = None, data_hash: str | None = None,
                     tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """Like `run`, on the run the checkpoint was trained in when there is one (its live curves and system
        metrics stay beside the registration), else on a new run."""
        if run_id is None:
            run_id = self.start_run(name, kind, data_hash, tags)
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, {**({TAG_DATA_HASH: data_hash} if data_hash else {}), **(tags or {})})
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        self.end_run(run_id)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def run(self, name: str, kind: str | None = None, data_hash: str | None = None,
            tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """`with tracker.run("stage1_step1") as run_id:` — FAILED when the block raises, FINISHED otherwise."""
        with self.continue_run(None, name, kind, data_hash, tags) as run_id:
            yield run_id

    def log_params(self, run_id: str, params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
        flat = flatten_params(params, prefix)
        items = [Param(k, v) for k, v in flat.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)
        return flat

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """A flat dict of numbers (e.g. the evaluation summary under the `registry` metric names)."""
        bad = [k for k, v in metrics.items() if not _is_number(v)]
        if bad:
            raise TypeError(f"metrics must be numbers; not numeric: {', '.join(bad)} (flatten the summary first)")
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)

    def log_metrics_file(self, run_id: str, path: Path, prefix: str = "") -> int:
        """Log a training `metrics.jsonl` (one JSON object per line with an integer `step`) as metric histories.

        Every numeric field except `step` becomes metric `prefix + field` at that step; a `time` field (seconds
        since the epoch), when present, is used as the point's timestamp. Returns the number of points logged.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"metrics file {path} not found (training writes it next to the checkpoint)")
        now = int(time.time() * 1000)
        points: list[Metric] = []
        for lineno, rec in iter_jsonl(path):
            if not isinstance(rec, dict) or not _is_number(rec.get("step")):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object with a numeric 'step'")
            step = int(rec["step"])
            ts = int(rec["time"] * 1000) if _is_number(rec.get("time")) else now
            for key, value in rec.items():
                if key in ("step", "time") or not _is_number(value):
                    continue
                points.append(Metric(prefix + key, float(value), ts, step))
        for chunk in _chunks(points, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)
        return len(points)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"artifact directory {local_dir} not found")
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
        local_file = Path(local_file)
        if not local_file.is_file():
            raise FileNotFoundError(f"artifact file {local_file} not found")
        self.client.log_artifact(run_id, str(local_file), artifact_path)

    def log_datasets(self, run_id: str, paths: list[str | Path], context: str = "training") -> dict[str, str]:
        """Each dataset folder as an `mlflow.data` input of the run: a MetaDataset named after the folder, its
        source the folder relative to the repo root, its digest the DVC md5 (`dvc_data_hash`). Returns name -> digest."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs, digests = [], {}
        for p in paths:
            rel = Path(os.path.relpath(Path(self.root, p), self.root)).as_posix()
            digest = dvc_data_hash([rel], self.root)
            ds = MetaDataset(LocalArtifactDatasetSource(rel), name=Path(rel).name, digest=digest)
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
            digests[ds.name] = digest
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)
        return digests

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk, synchronous=True)
