"""The root of params.yaml: every package's own config model, composed.

One file of knobs read identically by `dvc repro`, the Prefect flows and the CLI (`--set a.b=c`). It lives in
tasks/, the lowest package that sees every section (data, model, evaluation and registry configs are all below
it), so the steps and the benchmarks annotate their `params` with `Params`; flows/params.py re-exports it for the
CLI. The steps import it under TYPE_CHECKING only: loading it pulls in every package's config, which a step's
runtime code (and its DVC deps) does not need.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from data.config import DataConfig, Strict
from evaluation.config import EvalConfig
from model.config import ModelConfig, SrumConfig, TrainConfig
from registry.config import RegistryConfig


class PipelineConfig(Strict):
    artifacts: str = "artifacts"
    stage_order: list[str] = Field(
        default=["stage1_step1", "stage1_step2", "stage2_step1", "stage2_step2"],
        description="the training stages the pipeline runs, in order",
    )
    train_deployment: str | None = Field(
        None,
        description="run training stages as this Prefect deployment (e.g. 'scone-train-stage/gpu' on a GPU work "
                    "pool) instead of in the chain's process; the stages hand over through the DVC remote",
    )
    score_beside_training: bool = Field(
        True,
        description="score each checkpoint in a second thread while the next stage trains (training runs one "
                    "thread per rank); turn off when training already takes every core or device",
    )


class Params(Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig
    srum: SrumConfig = SrumConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    pipeline: PipelineConfig = PipelineConfig()


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names each key path and why."""


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ParamsError(f"--set {dotted}: '{k}' is a value, not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected key.path=value, e.g. --set train.micro_batch=4")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def load_params(path: str | Path = "params.yaml", overrides: list[str] | dict[str, str] | None = None) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run from the repository root or pass --params PATH)")
    try:
        tree: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections (data, model, train, ...)")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for k, v in (overrides or {}).items():
        _set_path(tree, k, v)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        lines = [f"{path}: invalid parameters"]
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {where}: {err['msg']}")
        raise ParamsError("\n".join(lines)) from None
