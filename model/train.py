"""The Scone stage recipe (Stage I / II are configuration: data mix, frozen experts, bridge, length).

`train_stage` runs on every rank of a torchrun world (or alone, in-process). Its setup is the stage's own (the
family's model and tokenizer, freezing, `StageLoss`, the data lanes of model.data_loader, `run_settings`); the
steps, the resumable state, the metrics log, the final save and the summary are the loop every recipe shares
(model.training; a SRUM round is the other recipe, model.srum_train). It writes into `out_dir`:

- the final checkpoint at `out_dir` itself, in the family's layout (BAGEL: a release directory, its weights
  sharded above train.max_shard_bytes). It is written by `save_final_weights`: under ZeRO-3 the weights are
  gathered one layer-sized group at a time and streamed into the files, so no rank ever holds the whole model;
- `metrics.jsonl`: one JSON object per logged step (rank 0): step, loss, fm_loss, und_loss (means over the
  global batch), lr, grad_norm (before clipping), samples_per_s, wall_s, samples_seen;
- `train_summary.json`: written last, it marks the stage finished (a re-run then returns it unchanged);
- `ds_state/`: resumable DeepSpeed state every `train.save_every` steps, with the step and the position of every
  data lane (model.data_loader) as client state. A killed run re-run with the same arguments continues from
  there, with the same micro batches and the same per-step noise, so it ends on the weights of an uninterrupted run;
- `quarantine/<dataset>.parquet`: rows that failed to decode when training reached them (left out while within
  data.quality.max_quarantine_fraction), pooled from all ranks at every save and at the end;
- `run_settings.json`: what the run depends on (configs, world size, the data files' contents, the init
  checkpoint's weights, the model code); resuming or re-running with other settings raises `RunSettingsMismatch`.

`out_dir` is the stage's working folder: the pipeline trains in `artifacts/work/train/<stage>` and publishes
only the finished weights (tasks/train_stage.py), so the resumable state never enters a DVC output. The state
is loaded without unpickling code (model.safe_state): a crafted pickle in `ds_state/` is refused.

The loop takes the model, the tokenizer and the batching from a `ModelFamily`, named by import path
("module:attribute") so that it reaches torchrun's worker processes as a string. The project has one family,
BAGEL (model.bagel.family, the default); the seam stays because the trainer's tests run it on a fake family of a
few thousand parameters (tests/test_train_fakes.py), so that engine, data order, freezing and resume are tested
in seconds.
"""
from __future__ import annotations

import importlib
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from model import data_loader, engine as ds_engine
from model.bagel.release import FAMILY_SPEC
from model.config import BridgeConfig, ModelConfig, StageConfig, TrainConfig
from model.final_weights import save_final_weights, weight_groups  # noqa: F401 (model.train's API, tests use it)
from model.run_identity import (  # noqa: F401 (model.train's API: model.launch, tasks and tests import them here)
    METRICS,
    STATE_DIR,
    SUMMARY,
    RunSettingsMismatch,
    check_settings,
    claim_run,
    code_digest,
    finished_summary,
    train_settings,
    weights_digest,
)
from model.safe_state import file_digest
from model.training import Run, all_gather, noise_seed, to_device, train_loop  # noqa: F401 (noise_seed, to_device)

DEFAULT_FAMILY = FAMILY_SPEC  # "model.bagel.family:BAGEL"
EXPERTS = ("understanding", "generation")
VIT = "vit"  # the vision encoder: frozen unless a stage sets train_vit (family.expert_parameters("vit"))


@dataclass(frozen=True)
class ModelFamily:
    """What the stage trainer needs from a model family."""

    build: Callable[[ModelConfig, Any], nn.Module]  # (model config, tokenizer) -> model with fresh weights
    load: Callable[[Path], nn.Module]  # checkpoint dir -> model
    tokenizer: Callable[[Path | None], Any]  # tokenizer saved in a checkpoint dir, or a fresh one (None)
    examples_from_rows: Callable[[list[dict]], list]
    collate: Callable[[list, Any, ModelConfig], dict]
    # (example, tokenizer, model config) -> its tokens in the packed sequence; train.max_tokens_per_micro_batch
    # needs it
    sample_tokens: Callable[[Any, Any, ModelConfig], int] | None = None
    # (checkpoint dir, DeepSpeed config) -> model whose weights are already ZeRO-3 partitions (deepspeed.zero.Init),
    # so no rank ever holds the whole model; families without it load whole and DeepSpeed partitions afterwards
    load_zero3: Callable[[Path, dict], nn.Module] | None = None


def resolve_family(spec: str) -> ModelFamily:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"model family {spec!r}: expected 'module:attribute', e.g. {DEFAULT_FAMILY!r}")
    family = getattr(importlib.import_module(module), attr)
    if not isinstance(family, ModelFamily):
        raise TypeError(f"model family {spec!r} is a {type(family).__name__}, not a model.train.ModelFamily")
    return family


class StageLoss(nn.Module):
    """The stage's loss as the module DeepSpeed wraps, so ZeRO-3 gathers weights around the whole call."""

    def __init__(self, model: nn.Module, *, bridge: bool, und_loss_weight: float,
                 bridge_straight_through: bool = False, bridge_config: BridgeConfig | None = None):
        super().__init__()
        self.model = model
        self.bridge = bridge
        self.und_loss_weight = und_loss_weight
        self.bridge_straight_through = bridge_straight_through
        # A release's config carries no bridge settings, so BAGEL takes params' model.bridge per call; a family
        # without the argument (the trainer tests' fake) has no bridge settings to take.
        takes = bridge and "bridge_config" in inspect.signature(model.training_loss).parameters
        self.bridge_config = bridge_config if takes else None

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        extra = {"bridge_straight_through": True} if self.bridge_straight_through else {}  # other families need not know it
        if self.bridge_config is not None:
            extra["bridge_config"] = self.bridge_config
        return self.model.training_loss(batch, bridge=self.bridge, und_loss_weight=self.und_loss_weight,
                                        generator=generator, **extra)


def apply_freezing(model: nn.Module, stage: StageConfig) -> list[nn.Parameter]:
    """requires_grad only on the experts the stage trains (and the ViT with train_vit); everything else (ViT,
    latent encoder) is frozen.

    Returns the trainable parameters, in model order (what the optimizer gets).
    """
    wanted = {"understanding": stage.train_understanding, "generation": stage.train_generation}
    for p in model.parameters():
        p.requires_grad_(False)
    chosen: set[int] = set()
    for expert in EXPERTS:
        if wanted[expert]:
            chosen.update(id(p) for p in model.expert_parameters(expert))
    if stage.train_vit:
        chosen.update(id(p) for p in model.expert_parameters(VIT))
    trainable = [p for p in model.parameters() if id(p) in chosen]
    for p in trainable:
        p.requires_grad_(True)
    if not trainable:
        raise ValueError("the stage trains no parameters: set train_understanding, train_generation and/or "
                         "train_vit to true")
    return trainable


def run_settings(stage_name: str, stage: StageConfig, train: TrainConfig, model_cfg: ModelConfig,
                 data_root: str | Path, init_checkpoint: str | Path | None, world_size: int, family: str) -> dict:
    """Everything the stage's result depends on (not: logging and checkpoint intervals)."""
    # contents, not sizes: a same-size corruption or rebuild must not resume a run made on other data
    data = {name: file_digest(data_loader.dataset_files(data_root, name)) for name in stage.datasets}
    return {
        "stage_name": stage_name,
        "stage": stage.model_dump(mode="json"),
        "train": train_settings(train),
        "model": model_cfg.model_dump(mode="json"),
        "world_size": world_size,
        # the init checkpoint by content only: a moved or cloned checkout resumes the same run
        "init_checkpoint": bool(init_checkpoint),
        "init_weights": weights_digest(Path(init_checkpoint)) if init_checkpoint else None,
        "data": data,
        "model_family": family,
        "code": code_digest(),
    }


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Turn on per-layer recomputation (train.activation_checkpointing) in every module of `model` that offers it
    (a class attribute `activation_checkpointing`: BAGEL's language model and ViT); returns how many. A model
    with none is refused: the setting would otherwise change nothing without a word."""
    found = [m for m in model.modules() if isinstance(getattr(type(m), "activation_checkpointing", None), bool)]
    if not found:
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} has no module that supports it "
                         "(the BAGEL family has); set it to false")
    for m in found:
        m.activation_checkpointing = True
    return len(found)


class StageData:
    """The stage's data lanes (model.data_loader.StageBatches) as the loop reads them. Each rank streams the row
    groups of its own lanes; rows that fail to decode are left out below data.quality.max_quarantine_fraction,
    pooled over the ranks at every save and at the end, and written into `quarantine_dir` by rank 0."""

    def __init__(self, batches: data_loader.StageBatches, quarantine_dir: Path, rank: int):
        self.batches, self.quarantine_dir, self.rank = batches, quarantine_dir, rank

    @property
    def samples(self) -> int:
        return self.batches.samples

    def micro_batch(self, step: int, micro: int) -> tuple:
        return (self.batches.micro_batch(micro),)  # the lanes keep their own place: steps come in order

    def state(self) -> dict:
        """Every lane's position, pooled over the ranks (a collective), and the decode failures of all ranks
        (each rank checks the pooled count against max_quarantine_fraction)."""
        states = all_gather({**self.batches.state(), "failures": self.batches.ledger.export()})
        lanes = [0] * self.batches.sharding.lanes
        for state in states:
            for lane, position in state["lanes"].items():
                lanes[lane] = position
            self.batches.ledger.merge(state["failures"])
        if self.rank == 0:
            self.batches.ledger.write(self.quarantine_dir)
        return {"data_lanes": lanes}

    def restore(self, client: dict) -> None:
        self.batches.restore(client["data_lanes"])
        self.batches.ledger.read(self.quarantine_dir)  # decode failures found before the interruption still count

    def close(self) -> None:
        self.batches.close()  # stops the loader's worker processes


def train_stage(
    stage_name: str,
    stage: StageConfig,
    train: TrainConfig,
    model_cfg: ModelConfig,
    data_root: str | Path,
    out_dir: str | Path,
    init_checkpoint: str | Path | None = None,
    progress: bool = True,
    *,
    model_family: str = DEFAULT_FAMILY,
    max_quarantine_fraction: float = 0.05,
    live_metrics: dict | None = None,
) -> dict:
    """Train one stage on the ranks of the current process group (or alone) and return its summary.

    `init_checkpoint`: a checkpoint directory (the previous stage's out_dir, or for BAGEL's first stage the release
    directory) or None for the family's fresh weights (BAGEL has none without a release's tokenizer).
    """
    out_dir = Path(out_dir)
    init_checkpoint = Path(init_checkpoint) if init_checkpoint else None
    if init_checkpoint is not None and not (init_checkpoint / "config.json").exists():
        raise FileNotFoundError(
            f"stage {stage_name}: init checkpoint {init_checkpoint} has no config.json "
            f"(train the stage named in init_from first, or fix the path)"
        )
    t_start = time.perf_counter()
    rank, world = ds_engine.init_distributed()
    settings = run_settings(stage_name, stage, train, model_cfg, data_root, init_checkpoint, world, model_family)
    done = claim_run(out_dir, settings, rank)  # other settings: RunSettingsMismatch
    if done is not None:
        return done
    run = Run(stage_name, out_dir, train, stage, rank, world, ds_engine.resolve_precision(train.precision),
              ("loss", "fm_loss", "und_loss"), t_start, progress, live_metrics)

    family = resolve_family(model_family)
    torch.manual_seed(train.seed)  # identical fresh weights on every rank
    tokenizer = family.tokenizer(init_checkpoint)
    if init_checkpoint and train.zero_stage == 3 and family.load_zero3 is not None:
        model = family.load_zero3(init_checkpoint, ds_engine.deepspeed_config(train, world_size=world,
                                                                              precision=run.precision))
    else:
        model = family.load(init_checkpoint) if init_checkpoint else family.build(model_cfg, tokenizer)
    trainable = apply_freezing(model, stage)
    if train.activation_checkpointing:
        enable_activation_checkpointing(model)
    sample_tokens = None
    if train.max_tokens_per_micro_batch is not None:
        if family.sample_tokens is None:
            raise ValueError(f"train.max_tokens_per_micro_batch: model family {model_family} does not count a "
                             "sample's tokens (no sample_tokens); set it to null")
        sample_tokens = lambda example: family.sample_tokens(example, tokenizer, model_cfg)  # noqa: E731
    batches = data_loader.StageBatches(
        data_loader.StageIndex(data_root, stage.datasets),
        family.examples_from_rows,
        lambda examples: family.collate(examples, tokenizer, model_cfg),
        seed=train.seed,
        sharding=run.sharding,
        max_tokens=train.max_tokens_per_micro_batch,
        sample_tokens=sample_tokens,
        window=train.shuffle_window,
        num_workers=train.num_workers,
        max_quarantine_fraction=max_quarantine_fraction,
        mixture=stage.mixture,  # each dataset's share of the samples (null: in proportion to its rows)
    )
    loss = StageLoss(model, bridge=stage.bridge, und_loss_weight=stage.und_loss_weight,
                     bridge_straight_through=stage.bridge_straight_through, bridge_config=model_cfg.bridge)

    def summary(base: dict, rows: list[dict]) -> dict:
        return {
            **base,
            "global_batch": run.sharding.global_batch if train.max_tokens_per_micro_batch is None else None,
            "max_tokens_per_micro_batch": train.max_tokens_per_micro_batch,
            "activation_checkpointing": train.activation_checkpointing,
        }

    return train_loop(run, loss, trainable, StageData(batches, out_dir / "quarantine", rank), tokenizer,
                      summary=summary)
