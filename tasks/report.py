"""The HTML report over MLflow and the artifacts, written in staging and swapped into place whole."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from tasks.atomic import publish, staged
from tasks.paths import Paths

if TYPE_CHECKING:
    from tasks.params import Params


def report_step(params: Params) -> Path:
    from dashboards.report import build_report

    paths = Paths.from_params(params)
    with staged(paths.root, "report") as tmp:
        # the report reads by the same map the steps wrote by (it is built in staging, published beside them)
        build_report(paths, params.registry.tracking_uri, params.registry.model_name,
                     out=tmp / "reports" / paths.report_page.name, publish_dir=paths.reports)
        publish([(tmp / "reports", paths.reports)])
    log_report_to_candidate_run(params, paths.reports)
    return paths.report_page


def log_report_to_candidate_run(params: Params, reports: Path) -> str | None:
    """The report (HTML + pictures) as artifacts of the newest version's run, so the MLflow UI shows it too."""
    from registry import CANDIDATE_ALIAS, resolve_tracking_uri, sqlite_path
    from registry.models import version_by_alias
    from registry.tracking import Tracker

    db = sqlite_path(resolve_tracking_uri(params.registry.tracking_uri, Path(".")))
    if db is not None and not db.exists():  # nothing registered: no run to attach it to (and no store to create:
        return None  # checked before the Tracker, whose MLflow client would create the database)
    tracker = Tracker(params.registry, Path("."))
    candidate = version_by_alias(tracker.client, params.registry.model_name, CANDIDATE_ALIAS)
    if candidate is None or not candidate.run_id:
        return None
    tracker.log_artifacts(candidate.run_id, reports, "report")
    return candidate.run_id


report_task = task(report_step, name="report")
