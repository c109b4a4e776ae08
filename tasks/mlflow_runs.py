"""The MLflow run of a checkpoint, opened before the work that makes it, so curves and system metrics are live.

Only the tracking part of the registry is imported here (not the gate or the model registry), so the training
stages that open runs do not depend on registry code that has nothing to do with them (dvc.yaml lists these files).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params

RUN_FILE = "mlflow_run.json"  # published with the checkpoint; registration completes the same run


def open_mlflow_run(params: Params, name: str, folder: Path, kind: str = "stage"):
    """The checkpoint's MLflow run, opened before training so its curves and system metrics are live: the one
    `folder/mlflow_run.json` names when this store holds it (a resumed stage continues its run), else a new one.
    The file travels with the checkpoint; registration then completes the same run."""
    from registry.tracking import Tracker, source_tags

    tracker = Tracker(params.registry, Path("."))
    record = folder / RUN_FILE
    known = json.loads(record.read_text()).get("run_id") if record.exists() else None
    run_id = tracker.existing_run(known)
    if run_id is None:
        run_id = tracker.start_run(name, kind=kind, tags=source_tags(Path("."), f"scone {kind} ({name})"))
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"run_id": run_id}) + "\n")
    else:
        tracker.client.update_run(run_id, status="RUNNING")
    return tracker, run_id


def recorded_run(tracker, checkpoint: Path) -> str | None:
    """The run a checkpoint was made in, when this store holds it."""
    record = Path(checkpoint) / RUN_FILE
    return tracker.existing_run(json.loads(record.read_text()).get("run_id")) if record.exists() else None
