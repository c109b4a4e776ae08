"""Facts about a checkpoint of the chain that several tasks need: its stage config, bridge use, datasets."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.paths import Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params


def is_srum(name: str) -> bool:
    return name.startswith("srum_round")


def srum_index(name: str) -> int:
    return int(name.removeprefix("srum_round"))


def stage_of(params: Params, name: str) -> str:
    """The training stage whose recipe produced (or underlies) checkpoint `name`."""
    if is_srum(name):
        return params.srum.init_from
    if name not in params.train.stages:
        known = ", ".join(list(params.train.stages) + list(params.srum.rounds))
        raise KeyError(f"unknown checkpoint {name!r}; known: {known}")
    return name


def uses_bridge(params: Params, name: str) -> bool:
    """Sampling with the semantic mask: only with the switch eval.sampling.semantic_mask on, and only for
    checkpoints at or after the first stage that trained with it (before it, the mask means nothing)."""
    if not params.eval.sampling.semantic_mask:
        return False
    order = list(params.pipeline.stage_order)
    stage = stage_of(params, name)
    upto = order[: order.index(stage) + 1] if stage in order else [stage]
    return any(params.train.stages[s].bridge for s in upto)


def generation_trained(params: Params, name: str) -> bool:
    """Whether a stage up to checkpoint `name` (or a SRUM round) has trained the generation expert. Before that the
    checkpoint generates with the release's weights (the tiny release's are fresh: und_pretrain trains understanding
    only), so the generation benchmarks and the registry, whose versions are generation models gated on SconeEval,
    skip it; its understanding is scored like every checkpoint's."""
    if is_srum(name):
        return True
    order = list(params.pipeline.stage_order)
    stage = stage_of(params, name)
    upto = order[: order.index(stage) + 1] if stage in order else [stage]
    return any(params.train.stages[s].train_generation for s in upto)


def data_dirs(params: Params, name: str) -> list:
    """The dataset folders a checkpoint was trained on (for the DVC data hash on its registered version)."""
    p = Paths.from_params(params)
    if is_srum(name):
        return [p.data / "srum_prompts"]
    return [p.data / "parquet_data" / d for d in params.train.stages[name].datasets]
