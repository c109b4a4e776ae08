"""One SRUM self-reward round: generate -> propose regions -> self-judge -> reward maps -> reward-weighted training."""
from __future__ import annotations

from prefect import task

from tasks.paths import Paths, srum_name


def srum_round_step(params, index: int) -> dict:
    from evaluation.srum import run_round
    from data.formats.srum_prompts import read_prompts

    if index < 1:
        raise ValueError(f"SRUM rounds count from 1, got {index}")
    paths = Paths.from_params(params)
    init = paths.checkpoint(params.srum.init_from if index == 1 else srum_name(index - 1))
    if not (init / "config.json").exists():
        raise FileNotFoundError(f"SRUM round {index} starts from {init}, which does not exist: train it first")
    summary = run_round(
        init,
        read_prompts(paths.data / "srum_prompts" / "prompts.jsonl"),
        params.srum,
        params.eval.sampling,
        paths.srum,
        index,
        ckpt_dir=paths.checkpoint(srum_name(index)),
        model_cfg=params.model,
        train_cfg=params.train,
        progress=True,
    )
    return summary


srum_round_task = task(srum_round_step, name="srum_round", task_run_name="srum-round-{index}")
