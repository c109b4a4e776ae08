"""The whole chain as one Prefect flow: the same steps, in the same order, as `dvc.yaml`.

build_data -> validate_data -> stage1_step1 -> stage1_step2 -> stage2_step1 (bridge) -> stage2_step2
-> srum rounds -> (each checkpoint: evaluate -> register -> gate) -> report -> dvc commit
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import load_params
from tasks.datasets import all_names, build_dataset_task, validate_dataset_task
from tasks.dvc import dvc_commit_task
from tasks.evaluate import evaluate_task
from tasks.paths import srum_name
from tasks.register import register_task
from tasks.report import report_task
from tasks.srum import srum_round_task
from tasks.train_stage import train_stage_task


@flow(name="scone-pipeline", log_prints=True)
def scone_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, dvc_commit: bool = True) -> dict:
    log = get_run_logger()
    params = load_params(params_path, overrides)
    for name in all_names():
        build_dataset_task(params, name)
    for name in all_names():
        validate_dataset_task(params, name)

    results: dict[str, dict] = {}
    for stage in params.pipeline.stage_order:
        train_stage_task(params, stage)
        evaluate_task(params, stage)
        results[stage] = register_task(params, stage)
    for k in range(1, params.srum.rounds + 1):
        name = srum_name(k)
        srum_round_task(params, k)
        evaluate_task(params, name)
        results[name] = register_task(params, name)

    report = report_task(params)
    log.info("report: %s", report)
    if dvc_commit and not overrides:
        dvc_commit_task()
    elif overrides:
        log.warning("overrides given (%s): dvc.lock left untouched, since it must match params.yaml", overrides)
    return {"report": str(report), "checkpoints": results}
