"""SRUM self-reward rounds as their own Prefect flow (`scone srum --rounds N`)."""
from __future__ import annotations

from prefect import flow

from flows.params import load_params
from tasks.evaluate import evaluate_task
from tasks.paths import srum_name
from tasks.register import register_task
from tasks.report import report_task
from tasks.srum import srum_round_task


@flow(name="scone-srum", log_prints=True)
def srum_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, rounds: int | None = None) -> dict:
    params = load_params(params_path, overrides)
    n = params.srum.rounds if rounds is None else rounds
    out = {}
    for k in range(1, n + 1):
        name = srum_name(k)
        srum_round_task(params, k)
        evaluate_task(params, name)
        out[name] = register_task(params, name)
    report_task(params)
    return out
