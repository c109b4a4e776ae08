"""SRUM self-reward rounds: one subflow used by the pipeline and by the `srum-weekly` deployment.

`srum_rounds` trains rounds 1..N, each when DVC calls it stale. `srum_flow` (the deployment, `scone srum
--rounds N`) adds scoring, registration and the report around it, holding the artifacts lock like the
pipeline, so the two deployments never write the same folders at once. Rounds beyond `srum.rounds` have no stage
in dvc.yaml: asking for them turns the record off and every step recomputes.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.artifacts import publish_run_artifacts
from flows.params import load_params
from tasks import freshness as fr
from tasks.atomic import clear_staging
from tasks.evaluate import evaluate_task
from tasks.lock import artifacts_lock
from tasks.paths import Paths
from tasks.register import register_all_task
from tasks.report import report_task
from tasks.srum import srum_round_task


@flow(name="scone-srum-rounds", log_prints=True)
def srum_rounds(params_path: str = "params.yaml", overrides: list[str] | None = None, record: bool = True) -> list[str]:
    """The rounds of srum.rounds in order, each from the previous round's checkpoint (round 1 from a stage's)."""
    log = get_run_logger()
    params = load_params(params_path, overrides)
    ledger = fr.Ledger.for_run(Path.cwd(), params_path, overrides, record=record)
    with artifacts_lock(Paths.from_params(params).root, command="scone srum rounds"):
        for k in range(1, params.srum.count + 1):
            ledger.run_if_stale(fr.srum_stage(k), srum_round_task, params, k, log=log)
    return list(params.srum.rounds)


@flow(name="scone-srum", log_prints=True)
def srum_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, rounds: int | None = None) -> dict:
    log = get_run_logger()
    overrides = list(overrides or [])
    if rounds is not None:
        overrides.append(f"srum.rounds={rounds}")
    params = load_params(params_path, overrides)
    if rounds is not None and params.srum.rounds == load_params(params_path).srum.rounds:
        overrides.pop()  # the rounds params.yaml already asks for: the DVC record still applies
    root = Paths.from_params(params).root
    ledger = fr.Ledger.for_run(Path.cwd(), params_path, overrides)
    with artifacts_lock(root, command="scone srum flow"):
        clear_staging(root)
        names = srum_rounds(params_path, overrides)
        for name in names:
            ledger.run_if_stale(fr.evaluate_stage(name), evaluate_task, params, name, log=log)
        ledger.run_if_stale(fr.REGISTER_STAGE, register_all_task, params, log=log)
        ledger.run_if_stale(fr.REPORT_STAGE, report_task, params, log=log)
        publish_run_artifacts(params)
    return {"rounds": names}
