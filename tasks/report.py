"""The HTML report over MLflow and the artifacts, written in staging and swapped into place whole."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.atomic import publish, staged
from tasks.paths import Paths


def report_step(params) -> Path:
    from dashboards.report import build_report

    paths = Paths.from_params(params)
    with staged(paths.root, "report") as tmp:
        build_report(paths.root, params.registry.tracking_uri, params.registry.model_name,
                     out=tmp / "reports" / "index.html")
        publish([(tmp / "reports", paths.reports)])
    return paths.reports / "index.html"


report_task = task(report_step, name="report")
