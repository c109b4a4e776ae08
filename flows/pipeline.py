"""The whole chain as one Prefect flow: the stages of `dvc.yaml`, in its order, with DVC deciding what is stale.

build_data -> validate_data -> stage1_step1 -> stage1_step2 -> stage2_step1 (bridge) -> stage2_step2
-> srum rounds -> evaluate (each checkpoint) -> register + gate (each checkpoint, in order) -> report

Each step asks DVC whether its stage is up to date (code, params and upstream outputs, as `dvc.yaml` lists them);
a stale step runs and, only then, its stage is recorded in dvc.lock (tasks.freshness). So `dvc repro` afterwards
re-runs nothing, and a code change re-runs exactly the stages that depend on that code, and what follows them.
The flow holds the artifacts lock (tasks.lock) from start to end: one chain writes an artifacts folder at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger

from flows.params import load_params
from tasks import freshness as fr
from tasks.atomic import clear_staging
from tasks.datasets import all_names, build_dataset_task, validate_dataset_task
from tasks.evaluate import evaluate_task
from tasks.lock import artifacts_lock
from tasks.paths import Paths, checkpoint_names
from tasks.register import register_all_task
from tasks.report import report_task
from tasks.srum import srum_round_task
from tasks.train_stage import train_stage_task


def run_if_stale(ledger: fr.Ledger, stage: str, step: Callable, *args, log=None):
    """Run `step(*args)` when DVC says `stage` is stale, then record the stage; else say it is up to date."""
    changes = ledger.changes(stage)
    if not changes:
        msg = f"{stage}: up to date (dvc.lock matches its code, params and inputs)"
        (log.info if log else print)(msg)
        return None
    if log and ledger.enabled:
        log.info("%s: running (%s)", stage, "; ".join(map(str, changes))[:300])
    result = step(*args)
    ledger.record(stage)
    return result


def validate_all(params) -> list[dict]:
    """Every dataset's suite, even after one fails; then one error naming every failure (shard, key, fix)."""
    from data.validate import validate_all as each_then_raise

    return each_then_raise(all_names(), lambda name: validate_dataset_task(params, name))


@flow(name="scone-pipeline", log_prints=True)
def scone_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, dvc_commit: bool = True) -> dict:
    log = get_run_logger()
    params = load_params(params_path, overrides)
    paths = Paths.from_params(params)
    ledger = fr.Ledger.for_run(Path.cwd(), params_path, overrides, record=dvc_commit)
    if not ledger.enabled:
        log.warning("every step recomputes and dvc.lock is left untouched: %s", ledger.reason)

    with artifacts_lock(paths.root, command="scone pipeline"):
        clear_staging(paths.root)  # what a killed run left; we are the only writer now
        for name in all_names():
            run_if_stale(ledger, fr.BUILD_STAGES[name], build_dataset_task, params, name, log=log)
        run_if_stale(ledger, fr.VALIDATE_STAGE, validate_all, params, log=log)
        for stage in params.pipeline.stage_order:
            run_if_stale(ledger, fr.train_stage(stage), train_stage_task, params, stage, log=log)
        for k in range(1, params.srum.rounds + 1):
            run_if_stale(ledger, fr.srum_stage(k), srum_round_task, params, k, log=log)
        for name in checkpoint_names(params):
            run_if_stale(ledger, fr.evaluate_stage(name), evaluate_task, params, name, log=log)
        run_if_stale(ledger, fr.REGISTER_STAGE, register_all_task, params, log=log)
        run_if_stale(ledger, fr.REPORT_STAGE, report_task, params, log=log)

    records = {p.stem: p.read_text() for p in sorted(paths.registry_records.glob("*.json"))}
    report = paths.reports / "index.html"
    log.info("report: %s", report)
    return {"report": str(report), "checkpoints": sorted(records)}
