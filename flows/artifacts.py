"""What a Prefect user reads on a flow run's Artifacts tab: the scores per checkpoint, the gate decisions with
their reasons, and where the report is. Built from the registry records and DVC metrics files the chain wrote,
so they appear whether this run recomputed those steps or found them up to date."""
from __future__ import annotations

import json

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.paths import Paths, checkpoint_names


def _read(path):
    return json.loads(path.read_text()) if path.exists() else None


def score_rows(params) -> list[dict]:
    paths = Paths.from_params(params)
    rows = []
    for name in checkpoint_names(params):
        scores = _read(paths.score_metrics(name)) or {}
        record = _read(paths.registry_records / f"{name}.json") or {}
        rows.append({"checkpoint": name, "version": record.get("version"), "gate": record.get("decision"),
                     **{k: round(v, 3) for k, v in scores.items()}})
    return rows


def gate_markdown(params) -> str:
    paths = Paths.from_params(params)
    lines = ["# Gate decisions", "", f"Model `{params.registry.model_name}`; thresholds: "
             f"`{json.dumps(params.registry.gate.model_dump())}`", ""]
    for name in checkpoint_names(params):
        record = _read(paths.registry_records / f"{name}.json")
        if record is None:
            lines.append(f"- **{name}**: not registered")
            continue
        lines.append(f"- **{name}** (v{record.get('version')}): **{record.get('decision')}**")
        lines += [f"  - {r}" for r in record.get("reasons") or ["(decided in an earlier run; see the version's gate.reasons tag)"]]
    return "\n".join(lines)


def publish_run_artifacts(params) -> None:
    paths = Paths.from_params(params)
    create_table_artifact(key="sconeeval-scores", table=score_rows(params),
                          description="SconeEval averages (0-10) and T2I accuracy per checkpoint, with its MLflow "
                                      "version and gate decision")
    create_markdown_artifact(key="gate-decisions", markdown=gate_markdown(params),
                             description="why each checkpoint was promoted or not")
    report = paths.report_page
    if report.exists():
        create_link_artifact(key="report", link=report.resolve().as_uri(), link_text=str(report),
                             description="the HTML report (scores, curves, samples, data cards)")
