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
    log_report_to_candidate_run(params, paths.reports)
    return paths.reports / "index.html"


def log_report_to_candidate_run(params, reports: Path) -> str | None:
    """The report (HTML + pictures) as artifacts of the newest version's run, so the MLflow UI shows it too."""
    from registry.models import CANDIDATE_ALIAS, version_by_alias
    from registry.tracking import Tracker, sqlite_path

    tracker = Tracker(params.registry, Path("."))
    db = sqlite_path(tracker.tracking_uri)
    if db is not None and not db.exists():  # nothing registered: no run to attach it to (and no store to create)
        return None
    candidate = version_by_alias(tracker.client, params.registry.model_name, CANDIDATE_ALIAS)
    if candidate is None or not candidate.run_id:
        return None
    tracker.log_artifacts(candidate.run_id, reports, "report")
    return candidate.run_id


report_task = task(report_step, name="report")
