"""The HTML report over MLflow and the artifacts."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.paths import Paths


def report_step(params) -> Path:
    from dashboards.report import build_report

    paths = Paths.from_params(params)
    return build_report(paths.root, params.registry.tracking_uri, params.registry.model_name,
                        out=paths.reports / "index.html")


report_task = task(report_step, name="report")
