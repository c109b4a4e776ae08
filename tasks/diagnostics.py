"""The evaluate step's diagnostics of one checkpoint (evaluation.diagnostics): bridge localisation against the
rendered subject masks, the `self` judge against the oracle on SconeEval's first-round images, a contact sheet.

Called by tasks.evaluate once the checkpoint's scores folder is published (it reads the images SconeEval wrote
there): the pictures and per-case details are staged and swapped into `<scores>/<name>/diagnostics/`, the flat
figures go to the DVC metrics file `<metrics>/diagnostics/<name>.json` and, under `diagnostics.*`, into the checkpoint's
MLflow run with the contact sheet and the showcased overlay.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tasks.atomic import publish, staged, write_json
from tasks.paths import Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params


def diagnostics_step(params: Params, name: str, pipe) -> dict:
    """Diagnostics of checkpoint `name` from its loaded pipeline `pipe`; returns the result (details included).
    A checkpoint without generated images (no generation trained yet) gets the bridge figures and a contact sheet
    without its generated column."""
    from evaluation.diagnostics import FILES, format_summary, headline, run_diagnostics

    paths = Paths.from_params(params)
    images = paths.sconeeval_dir(name) / "images_try1"  # SconeEval's first sampling round (evaluation.runner)
    with staged(paths.root, f"diagnostics-{name}") as tmp:
        result = run_diagnostics(pipe, paths.sconeeval_bench, images, tmp / "diagnostics")
        publish([(tmp / "diagnostics", paths.diagnostics_dir(name))])
    write_json(paths.diagnostics_metrics(name), headline(result))
    _log(params, paths, name, result, [FILES["contact_sheet"], result["pictures"]["overlay"], FILES["details"]])
    print(format_summary(name, result))
    return result


def _log(params: Params, paths: Paths, name: str, result: dict, files: list[str | None]) -> None:
    """The figures and pictures join the run the checkpoint was made in (skipped when this store lacks it)."""
    from evaluation.diagnostics import mlflow_metrics
    from registry.tracking import Tracker
    from tasks.mlflow_runs import recorded_run

    tracker = Tracker(params.registry, Path("."))
    run_id = recorded_run(tracker, paths.checkpoint(name))
    if run_id is None:
        return
    tracker.log_metrics(run_id, mlflow_metrics(result))
    for rel in files:
        if rel and (paths.diagnostics_dir(name) / rel).is_file():
            tracker.log_artifact(run_id, paths.diagnostics_dir(name) / rel, "diagnostics")
