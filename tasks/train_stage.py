"""One Scone training stage on DeepSpeed ranks (params.train.num_ranks), resumable, published atomically.

The stage trains in its working folder `artifacts/work/train/<stage>/` (DeepSpeed state, run settings, worker
log): a killed run resumes there with the same data order and ends on the weights of an uninterrupted run. Only
when training has finished are the checkpoint files moved into `artifacts/checkpoints/<stage>/` in one swap, so
the published checkpoint is always a complete one, and the previous one stays until the new one is ready.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from tasks.atomic import publish, staged
from tasks.dvc_metrics import write_loss_curve
from tasks.mlflow_runs import open_mlflow_run
from tasks.paths import Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params

# Files of the working folder that are how the stage was run, not the model.
WORK_ONLY = ("ds_state", "run_settings.json", "run_config.json", "worker.log")


def train_step(params: Params, stage_name: str) -> dict:
    from model.launch import run_stage
    from model.train import RunSettingsMismatch

    if stage_name not in params.train.stages:
        raise KeyError(f"unknown stage {stage_name!r}; params.yaml train.stages has {', '.join(params.train.stages)}")
    paths = Paths.from_params(params)
    stage = params.train.stages[stage_name]
    init, family = _init_and_family(params, stage, paths)
    work = paths.train_work(stage_name)

    def run():
        tracker, run_id = open_mlflow_run(params, stage_name, work)
        try:
            result = run_stage(stage_name, stage, params.train, params.model, paths.data, work, init_checkpoint=init,
                               model_family=family,
                               max_quarantine_fraction=params.data.quality.max_quarantine_fraction,
                               live_metrics=tracker.live_destination(run_id))
        except BaseException:
            tracker.end_run(run_id, "FAILED")  # a resumed run re-opens it
            raise
        tracker.end_run(run_id)
        return result

    try:
        summary = run()
    except RunSettingsMismatch as e:
        # an interrupted run with other settings (code, data, params or init weights): its state cannot be
        # resumed; the published checkpoint is untouched until the new run finishes
        print(f"{stage_name}: settings changed since the interrupted run, training afresh ({e})")
        shutil.rmtree(work)
        summary = run()
    _publish_checkpoint(work, paths.checkpoint(stage_name), paths.root, stage_name)
    shutil.rmtree(work)
    write_loss_curve(paths.train_log(stage_name), paths.loss_curve(stage_name))
    summary["checkpoint"] = str(paths.checkpoint(stage_name))
    summary["metrics"] = str(paths.train_log(stage_name))
    return summary


def _init_and_family(params: Params, stage, paths: Paths) -> tuple[Path, str]:
    """Where a stage starts: the previous stage's checkpoint, or for the first stage the release directory (the
    chain's own, or model.release); and the model family that trains it."""
    from model.bagel.release import FAMILY_SPEC

    init = paths.checkpoint(stage.init_from) if stage.init_from else paths.release(params)
    if not init.is_dir():
        how = ("train that stage first" if stage.init_from else
               "run `scone bootstrap tokenizer|autoencoder|vit|release` (or point model.release at a downloaded one)")
        raise FileNotFoundError(f"the stage starts from {init}, which does not exist: {how}")
    return init, FAMILY_SPEC


def _publish_checkpoint(work: Path, dest: Path, artifacts: Path, stage_name: str) -> None:
    with staged(artifacts, f"checkpoint-{stage_name}") as tmp:
        out = tmp / dest.name
        out.mkdir()
        for item in work.iterdir():  # moved, not copied: at 7B these are tens of GB
            if item.name not in WORK_ONLY:
                shutil.move(str(item), out / item.name)
        publish([(out, dest)])


# A retry resumes from the last DeepSpeed state of the stage's working folder, with the same data order.
train_stage_task = task(train_step, name="train_stage", task_run_name="train-{stage_name}", retries=1,
                        retry_delay_seconds=5)
