"""One SRUM self-reward round: generate -> propose regions -> self-judge -> reward maps -> reward-weighted training."""
from __future__ import annotations

import json

from prefect import task

from tasks.paths import Paths, srum_name
from tasks.stamps import file_md5, is_fresh, tree_md5, write_stamp


def srum_round_step(params, index: int) -> dict:
    from evaluation.srum import run_round
    from data.formats.srum_prompts import read_prompts

    if index < 1:
        raise ValueError(f"SRUM rounds count from 1, got {index}")
    paths = Paths.from_params(params)
    init = paths.checkpoint(params.srum.init_from if index == 1 else srum_name(index - 1))
    if not (init / "config.json").exists():
        raise FileNotFoundError(f"SRUM round {index} starts from {init}, which does not exist: train it first")
    ckpt = paths.checkpoint(srum_name(index))
    round_dir = paths.srum_round(index)
    inputs = {"init": file_md5(init / "model.safetensors"), "srum": params.srum.model_dump(),
              "sampling": params.eval.sampling.model_dump(), "prompts": tree_md5(paths.data / "srum_prompts")}
    if is_fresh(round_dir, inputs, [ckpt / "model.safetensors", round_dir / "summary.json"]):
        print(f"SRUM round {index}: up to date (same start checkpoint, prompts and srum params)")
        return json.loads((round_dir / "summary.json").read_text())
    summary = run_round(
        init,
        read_prompts(paths.data / "srum_prompts" / "prompts.jsonl"),
        params.srum,
        params.eval.sampling,
        paths.srum,
        index,
        ckpt_dir=ckpt,
        model_cfg=params.model,
        train_cfg=params.train,
        openai_cfg=params.eval.openai,
        progress=True,
    )
    write_stamp(round_dir, inputs)
    return summary


srum_round_task = task(srum_round_step, name="srum_round", task_run_name="srum-round-{index}")
