"""One SRUM self-reward round: generate -> propose regions -> self-judge -> reward maps -> reward-weighted training.

The round's folder (`artifacts/srum/srum_roundk/`) and its checkpoint (`artifacts/checkpoints/srum_roundk/`) are
written in staging and replace the previous ones together, only when the round has finished.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task

from tasks.atomic import publish, repoint_json, staged
from tasks.paths import Paths, srum_name
from tasks.dvc_metrics import write_loss_curve
from tasks.mlflow_runs import open_mlflow_run

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params


def drop_run_files(ckpt) -> None:
    """Leave only the model in a trained round's checkpoint folder: its run settings and resumable state
    (model.run_identity.RUN_FILES) are how the round was run, as a stage's work-only files are."""
    import shutil

    from model.run_identity import RUN_FILES

    for name in RUN_FILES:
        path = ckpt / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def srum_round_step(params: Params, index: int) -> dict:
    from data.formats.srum_prompts import read_prompts
    from evaluation.srum import run_round

    if not 1 <= index <= params.srum.count:
        raise ValueError(f"SRUM round {index} is not in srum.rounds ({', '.join(params.srum.rounds) or 'none'}); "
                         f"add it to params.yaml or pass --set srum.rounds={index}")
    paths = Paths.from_params(params)
    init = paths.checkpoint(params.srum.rounds[srum_name(index)])
    if not (init / "config.json").exists():
        raise FileNotFoundError(f"SRUM round {index} starts from {init}, which does not exist: train it first")
    name = srum_name(index)
    with staged(paths.root, name) as tmp:
        srum_root, ckpt = tmp / "rounds", tmp / "checkpoint"  # neither name a prefix of the other
        tracker, run_id = open_mlflow_run(params, name, ckpt, kind="srum")
        try:
            summary = run_round(
                init,
                read_prompts(paths.srum_prompts),
                params.srum,
                params.eval.sampling,
                srum_root,
                index,
                ckpt_dir=ckpt,
                model_cfg=params.model,
                train_cfg=params.train,
                openai_cfg=params.eval.openai,
                progress=True,
                live_metrics=tracker.live_destination(run_id),
            )
        except BaseException:
            tracker.end_run(run_id, "FAILED")
            raise
        tracker.end_run(run_id)
        drop_run_files(ckpt)  # the staging folder goes with the step: its resumable state has nothing to resume
        round_dir = srum_root / f"round_{index}"  # where evaluation.srum.run_round writes it
        for folder in (round_dir, ckpt):
            repoint_json(folder, srum_root, paths.srum)
            repoint_json(folder, ckpt, paths.checkpoint(name))
        publish([(round_dir, paths.srum_round(index)), (ckpt, paths.checkpoint(name))])
    write_loss_curve(paths.train_log(name), paths.loss_curve(name))
    return summary


srum_round_task = task(srum_round_step, name="srum_round", task_run_name="srum-round-{index}")
