"""SRUM self-reward rounds as their own Prefect flow (`scone srum --rounds N`, the `srum-weekly` deployment).

Rounds beyond `srum.rounds` have no stage in dvc.yaml, so every step here recomputes; the flow holds the
artifacts lock like the pipeline, so the two deployments never write the same folders at once.
"""
from __future__ import annotations

from prefect import flow

from flows.params import load_params
from tasks.atomic import clear_staging
from tasks.evaluate import evaluate_task
from tasks.lock import artifacts_lock
from tasks.paths import Paths, srum_name
from tasks.register import register_task
from tasks.report import report_task
from tasks.srum import srum_round_task


@flow(name="scone-srum", log_prints=True)
def srum_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, rounds: int | None = None) -> dict:
    params = load_params(params_path, overrides)
    n = params.srum.rounds if rounds is None else rounds
    out = {}
    root = Paths.from_params(params).root
    with artifacts_lock(root, command="scone srum flow"):
        clear_staging(root)
        for k in range(1, n + 1):
            name = srum_name(k)
            srum_round_task(params, k)
            evaluate_task(params, name)
            out[name] = register_task(params, name)
        report_task(params)
    return out
