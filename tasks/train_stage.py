"""One Scone training stage on DeepSpeed ranks (params.train.num_ranks), resumable, one checkpoint per stage."""
from __future__ import annotations

import shutil

from prefect import task

from tasks.paths import Paths


def train_step(params, stage_name: str) -> dict:
    from model.launch import run_stage
    from model.train import RunSettingsMismatch

    if stage_name not in params.train.stages:
        raise KeyError(f"unknown stage {stage_name!r}; params.yaml train.stages has {', '.join(params.train.stages)}")
    paths = Paths.from_params(params)
    stage = params.train.stages[stage_name]
    init = paths.checkpoint(stage.init_from) if stage.init_from else None
    out = paths.checkpoint(stage_name)

    def run():
        return run_stage(stage_name, stage, params.train, params.model, paths.data, out, init_checkpoint=init)

    try:
        return run()
    except RunSettingsMismatch as e:
        # A finished or interrupted run with other settings: its checkpoint (if any) was registered in MLflow
        # already, so the stage directory is a cache, not the record; start this stage afresh.
        print(f"{stage_name}: settings changed, training afresh ({e})")
        shutil.rmtree(out)
        return run()


# A retry resumes from the last DeepSpeed checkpoint of the stage (ds_state/), with the same data order.
train_stage_task = task(train_step, name="train_stage", task_run_name="train-{stage_name}", retries=1,
                        retry_delay_seconds=5)
