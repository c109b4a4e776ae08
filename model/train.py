"""Train one stage (Scone Stage I / II recipes are configuration: data mix, frozen experts, bridge, length).

`train_stage` runs on every rank of a torchrun world (or alone, in-process). It writes into `out_dir`:

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

import contextlib
import gc
import hashlib
import importlib
import inspect
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from data.formats.jsonl import ignore_bad_line, read_jsonl
from model import data_loader, engine as ds_engine
from model.bagel.release import FAMILY_SPEC
from model.config import BridgeConfig, ModelConfig, StageConfig, TrainConfig
from model.ema import WeightEMA
from model.safe_state import file_digest

DEFAULT_FAMILY = FAMILY_SPEC  # "model.bagel.family:BAGEL"
STATE_DIR = "ds_state"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
SETTINGS = "run_settings.json"
EXPERTS = ("understanding", "generation")
VIT = "vit"  # the vision encoder: frozen unless a stage sets train_vit (family.expert_parameters("vit"))


class RunSettingsMismatch(RuntimeError):
    """out_dir holds a run (finished or resumable) made with other settings."""


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


def noise_seed(seed: int, step: int, chunk: int) -> int:
    """Seed of the flow-matching noise of one micro batch: a function of its place in the global batch only,
    so a resumed run, or a different split of the same global batch over ranks, draws the same noise."""
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1)[0])


def code_digest() -> str:
    """Digest of the model package's source: a resumed run must continue with the code that started it."""
    root = Path(__file__).resolve().parent
    return file_digest(sorted(root.rglob("*.py")))


def weights_digest(checkpoint: Path, prefix_bytes: int = 64 << 20) -> str:
    """Identity of a checkpoint's weights: retraining changes the leading bytes of every weight file, while a
    copy or a DVC checkout of the same file does not (unlike mtimes). Reads at most `prefix_bytes` per file."""
    h = hashlib.sha256()
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with f.open("rb") as fh:
            h.update(fh.read(prefix_bytes))
    return h.hexdigest()[:16]


def run_settings(stage_name: str, stage: StageConfig, train: TrainConfig, model_cfg: ModelConfig,
                 data_root: str | Path, init_checkpoint: str | Path | None, world_size: int, family: str) -> dict:
    """Everything the stage's result depends on (not: logging and checkpoint intervals)."""
    # not: how the weights are computed or laid out on disk (recomputation, file sizes) or where the machines are
    # (world_size below is what the result depends on); a run may resume with other values of these
    t = train.model_dump(mode="json", exclude={"stages", "num_ranks", "log_every", "save_every",
                                               "activation_checkpointing", "max_shard_bytes",
                                               "zero3_persistence_threshold", "nodes", "node_rank", "rdzv_endpoint",
                                               "num_workers"})  # batches are the same for any num_workers
    # contents, not sizes: a same-size corruption or rebuild must not resume a run made on other data
    data = {name: file_digest(data_loader.dataset_files(data_root, name)) for name in stage.datasets}
    return {
        "stage_name": stage_name,
        "stage": stage.model_dump(mode="json"),
        "train": t,
        "model": model_cfg.model_dump(mode="json"),
        "world_size": world_size,
        # the init checkpoint by content only: a moved or cloned checkout resumes the same run
        "init_checkpoint": bool(init_checkpoint),
        "init_weights": weights_digest(Path(init_checkpoint)) if init_checkpoint else None,
        "data": data,
        "model_family": family,
        "code": code_digest(),
    }


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to resume or re-use a run of `out_dir` made with other settings."""
    path = out_dir / SETTINGS
    started = (out_dir / SUMMARY).exists() or (out_dir / STATE_DIR / "latest").exists()
    if started and path.exists():
        old = json.loads(path.read_text())
        diff = _differences(old, settings)
        if diff:
            raise RunSettingsMismatch(
                f"{out_dir} holds a run with other settings ({'; '.join(diff)}); "
                f"delete {out_dir} to train from scratch, or choose another output directory"
            )


def finished_summary(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / SUMMARY
    if path.exists() and (Path(out_dir) / "config.json").exists():
        return json.loads(path.read_text())
    return None


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """A collated batch's tensors on `device`, floating ones in `dtype`; its other entries (sample layouts,
    settings) as they are."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)  # bf16 engines hold bf16 weights; inputs must match
        out[k] = v
    return out


class MetricsLog:
    """metrics.jsonl of rank 0: one row per logged step, the throughput measured since the previous row."""

    def __init__(self, path: Path, *, start_step: int, wall_before: float, samples_before: int, write: bool):
        self.path, self.write = path, write
        self.wall_before = wall_before
        self.t0 = self.t_prev = time.perf_counter()
        self.samples_prev = samples_before  # packed micro batches hold varying sample counts: count, not multiply
        self.last: dict = {}
        if write and path.exists():
            # rows after the resumed state are about to be recomputed; a row cut short by a crash goes too
            keep = [r for r in read_jsonl(path, ignore_bad_line) if r["step"] <= start_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def log(self, step: int, losses: torch.Tensor, lr: float, grad_norm, samples_seen: int) -> dict:
        now = time.perf_counter()
        self.last = {
            "step": step,
            "loss": float(losses[0]),
            "fm_loss": float(losses[1]),
            "und_loss": float(losses[2]),
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": (samples_seen - self.samples_prev) / max(now - self.t_prev, 1e-9),
            "wall_s": self.wall_s(),
            "samples_seen": samples_seen,
        }
        self.t_prev, self.samples_prev = now, samples_seen
        if self.write:
            with self.path.open("a") as f:
                f.write(json.dumps(self.last) + "\n")
        return self.last


def _save_state(eng, state_dir: Path, step: int, client_state: dict, rank: int, ema: WeightEMA | None) -> None:
    import torch.distributed as dist

    tag = f"step{step:07d}"
    if ema is not None:  # before DeepSpeed's `latest` names the tag: a resume must find the average beside it
        (state_dir / tag).mkdir(parents=True, exist_ok=True)
        ema.save(state_dir / tag / f"ema_rank{rank}.pt")
    eng.save_checkpoint(str(state_dir), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0:  # keep only the newest state: older ones are never resumed from
        for old in state_dir.iterdir():
            if old.is_dir() and old.name.startswith("step") and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


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


def _numel(p: nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned weight is empty outside a gather


def weight_groups(model: nn.Module) -> list[list[tuple[str, torch.Tensor]]]:
    """Every state-dict entry of `model` (parameters and persistent buffers, under state-dict keys) in groups that
    are held whole one at a time when saving: each element of an nn.ModuleList (a decoder layer, a ViT layer, an
    autoencoder block) is a group, and so is each other module that holds no ModuleList; a module with ModuleLists
    below it contributes its own direct entries as one group and is split along its children."""
    def own(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
        out = [(prefix + n, p) for n, p in module._parameters.items() if p is not None]
        return out + [(prefix + n, b) for n, b in module._buffers.items()
                      if b is not None and n not in module._non_persistent_buffers_set]

    groups: list[list[tuple[str, torch.Tensor]]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        if not any(isinstance(m, nn.ModuleList) for m in module.modules()):
            entries = [e for name, m in module.named_modules(remove_duplicate=False)
                       for e in own(m, f"{prefix}{name}." if name else prefix)]
            if entries:
                groups.append(entries)
            return
        if own(module, prefix):
            groups.append(own(module, prefix))
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return groups


def gather_weights(model: nn.Module, zero_stage: int, sink: Callable[[str, torch.Tensor], None] | None) -> float:
    """Hand each state-dict entry of `model`, whole, to `sink(key, tensor)` (None: this rank only takes part in
    the gathering), one `weight_groups` group at a time; returns this rank's checksum of the parameters.

    Under ZeRO-3 each group is gathered (a collective: every rank calls this) and re-partitioned before the next,
    so the full weights never exist at once on any rank; `sink` must copy what it keeps before it returns. Under
    ZeRO 0-2 every rank holds the whole model and nothing is gathered. Equal checksums on all ranks show that
    they ended on the same weights."""
    import contextlib

    import deepspeed

    groups = weight_groups(model)
    keys = [k for g in groups for k, _ in g]
    if sorted(keys) != sorted(model.state_dict().keys()):  # the grouping must be the state dict, entry for entry
        raise RuntimeError(f"weight groups of {type(model).__name__} differ from its state dict")
    checksum = None
    for group in groups:
        partitioned = [t for _, t in group if hasattr(t, "ds_id")] if zero_stage == 3 else []
        gathered = (deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None) if partitioned
                    else contextlib.nullcontext())
        with gathered:
            for key, tensor in group:
                if isinstance(tensor, nn.Parameter):
                    part = tensor.detach().double().sum()
                    checksum = part if checksum is None else checksum + part.to(checksum.device)
                if sink is not None:
                    sink(key, tensor.detach())
    return 0.0 if checksum is None else float(checksum)


def _final_weights(model: nn.Module, zero_stage: int, rank: int) -> tuple[dict[str, torch.Tensor] | None, float]:
    """(full fp32 state dict on rank 0, else None; this rank's checksum of the full weights), for savers that
    need the whole state dict at once (families without a `weights_writer`, SRUM rounds)."""
    state: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    sink = None if state is None else (lambda k, v: state.__setitem__(k, v.to("cpu", torch.float32, copy=True)))
    return state, gather_weights(model, zero_stage, sink)


def save_final_weights(model: nn.Module, out_dir: Path, zero_stage: int, rank: int,
                       max_shard_bytes: int | None = None) -> float:
    """Write the trained weights into out_dir (rank 0) and return this rank's checksum; every rank calls it.

    A family whose model has `weights_writer(out_dir, max_shard_bytes)` (BAGEL) gets them streamed group by group
    (`gather_weights`) into a writer that casts each to the checkpoint's dtype and writes shards as they fill:
    rank 0 holds about one group plus one shard, never the whole model. Others get the whole fp32 state dict
    through `save_pretrained(out_dir, state_dict=...)`."""
    if rank == 0:  # no summary yet, so any weights here are an interrupted save's: a release is never written over
        for stale in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.safetensors.index.json"),
                      *out_dir.glob(".*.partial")]:
            stale.unlink()
    open_writer = getattr(model, "weights_writer", None)
    if open_writer is None:
        state, checksum = _final_weights(model, zero_stage, rank)
        if rank == 0:
            model.save_pretrained(out_dir, state_dict=state)
        return checksum
    writer = open_writer(out_dir, max_shard_bytes=max_shard_bytes) if rank == 0 else None
    try:
        checksum = gather_weights(model, zero_stage, None if writer is None else writer.add)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    return checksum


def _pool_data(batches: data_loader.StageBatches, quarantine_dir: Path, rank: int, samples_before: int) -> dict:
    """The data loader's part of the client state, pooled over the ranks (a collective: every rank calls it):
    every lane's position and the samples served. Rows that failed to decode on any rank are pooled too (each
    rank checks the pooled count against max_quarantine_fraction) and rank 0 writes them to quarantine_dir."""
    states = _all_gather({**batches.state(), "failures": batches.ledger.export()})
    lanes = [0] * batches.sharding.lanes
    for state in states:
        for lane, position in state["lanes"].items():
            lanes[lane] = position
        batches.ledger.merge(state["failures"])
    if rank == 0:
        batches.ledger.write(quarantine_dir)
    return {"data_lanes": lanes, "samples_seen": samples_before + sum(state["samples"] for state in states)}


def _all_gather(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


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
    import torch.distributed as dist
    from tqdm.auto import tqdm

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
    check_settings(out_dir, settings)
    done = finished_summary(out_dir)
    if done is not None:
        return done

    family = resolve_family(model_family)
    precision = ds_engine.resolve_precision(train.precision)
    sharding = data_loader.Sharding(train.micro_batch, train.grad_accum, world, rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = out_dir / STATE_DIR
    if rank == 0:
        (out_dir / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")

    torch.manual_seed(train.seed)  # identical fresh weights on every rank
    tokenizer = family.tokenizer(init_checkpoint)
    if init_checkpoint and train.zero_stage == 3 and family.load_zero3 is not None:
        model = family.load_zero3(init_checkpoint, ds_engine.deepspeed_config(train, world_size=world,
                                                                              precision=precision))
    else:
        model = family.load(init_checkpoint) if init_checkpoint else family.build(model_cfg, tokenizer)
    trainable = apply_freezing(model, stage)
    if train.activation_checkpointing:
        enable_activation_checkpointing(model)
    n_trainable = sum(_numel(p) for p in trainable)
    n_total = sum(_numel(p) for p in model.parameters())
    sample_tokens = None
    if train.max_tokens_per_micro_batch is not None:
        if family.sample_tokens is None:
            raise ValueError(f"train.max_tokens_per_micro_batch: model family {model_family} does not count a "
                             "sample's tokens (no sample_tokens); set it to null")
        sample_tokens = lambda example: family.sample_tokens(example, tokenizer, model_cfg)  # noqa: E731
    # each rank streams the row groups of its own lanes (model.data_loader); rows that fail to decode are left out
    # below data.quality.max_quarantine_fraction and pooled into out_dir/quarantine by rank 0 (_pool_data)
    quarantine_dir = out_dir / "quarantine"
    batches = data_loader.StageBatches(
        data_loader.StageIndex(data_root, stage.datasets),
        family.examples_from_rows,
        lambda examples: family.collate(examples, tokenizer, model_cfg),
        seed=train.seed,
        sharding=sharding,
        max_tokens=train.max_tokens_per_micro_batch,
        sample_tokens=sample_tokens,
        window=train.shuffle_window,
        num_workers=train.num_workers,
        max_quarantine_fraction=max_quarantine_fraction,
        mixture=stage.mixture,  # each dataset's share of the samples (null: in proportion to its rows)
    )

    t_engine = time.perf_counter()
    eng = ds_engine.build_engine(StageLoss(model, bridge=stage.bridge, und_loss_weight=stage.und_loss_weight,
                                           bridge_straight_through=stage.bridge_straight_through,
                                           bridge_config=model_cfg.bridge),
                                 trainable, train, stage, world_size=world, precision=precision)
    eng.train()  # from_pretrained hands back a model in eval mode (no condition dropout)
    client: dict = {}
    if (state_dir / "latest").exists():
        from model.safe_state import load_engine_state

        _, client = load_engine_state(eng, state_dir)
        client = client or {}
    ema = WeightEMA(trainable, train.ema_decay) if train.ema_decay else None
    if ema is not None and (state_dir / "latest").exists():
        ema.load(state_dir / (state_dir / "latest").read_text().strip() / f"ema_rank{rank}.pt")
    engine_init_s = time.perf_counter() - t_engine
    step = resumed_from = int(client.get("step", 0))
    samples_before = samples_seen = int(client.get("samples_seen", 0))
    if step:
        batches.restore(client["data_lanes"])
        batches.ledger.read(quarantine_dir)  # decode failures found before the interruption still count
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    log = MetricsLog(out_dir / METRICS, start_step=step, wall_before=float(client.get("train_wall_s", 0.0)),
                     samples_before=samples_before, write=rank == 0)
    from model.live_metrics import open_live_metrics

    live = open_live_metrics(live_metrics) if rank == 0 else None  # {"tracking_uri", "run_id"} or None
    setup_s = time.perf_counter() - t_start
    bar = tqdm(total=stage.steps, initial=step, desc=stage_name, unit="step", disable=not (progress and rank == 0))
    try:
        while step < stage.steps:
            lr = float(eng.get_lr()[0])
            losses = torch.zeros(3, dtype=torch.float64, device=eng.device)  # loss, fm_loss, und_loss
            for micro in range(train.grad_accum):
                seed = noise_seed(train.seed, step, sharding.chunk(micro))
                torch.manual_seed(seed)  # covers any randomness the model draws outside the generator
                gen = torch.Generator(device=eng.device).manual_seed(seed)
                out = eng(to_device(batches.micro_batch(micro), eng.device, dtype), generator=gen)
                eng.backward(out["loss"])
                eng.step()
                losses += torch.stack([out[k].detach().double() for k in ("loss", "fm_loss", "und_loss")])
            if ema is not None:
                ema.update()
            step += 1
            bar.update(1)
            if step % train.log_every == 0 or step == stage.steps:
                # with the samples every rank has served: a packed step's sample count is known only by summing
                totals = torch.cat([losses, torch.tensor([float(batches.samples)], dtype=torch.float64,
                                                         device=eng.device)])
                dist.all_reduce(totals)
                samples_seen = samples_before + int(totals[3])
                row = log.log(step, totals[:3].cpu() / (train.grad_accum * world), lr, eng.get_global_grad_norm(),
                              samples_seen)
                if live is not None:
                    live(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if progress and rank == 0:  # a plain line too: orchestrators (Prefect's log_prints) log prints
                    print(f"{stage_name}: step {step}/{stage.steps} loss {row['loss']:.4f} "
                          f"({row['samples_per_s']:.1f} samples/s)", flush=True)
            if step % train.save_every == 0 and step < stage.steps:
                data = _pool_data(batches, quarantine_dir, rank, samples_before)
                _save_state(eng, state_dir, step, {"step": step, **data, "train_wall_s": log.wall_s()}, rank, ema)
        loop_s = time.perf_counter() - log.t0
        samples_seen = _pool_data(batches, quarantine_dir, rank, samples_before)["samples_seen"]
        bar.close()

        with ema.swapped_in() if ema is not None else contextlib.nullcontext():  # a release ships the average
            checksum = save_final_weights(eng.module.model, out_dir, train.zero_stage, rank, train.max_shard_bytes)
        checksums = _all_gather(checksum)
        if rank == 0:
            tokenizer.save_pretrained(out_dir)
        steps_run = step - resumed_from
        summary = {
            "stage": stage_name,
            "steps": step,
            "steps_this_run": steps_run,
            "resumed_from_step": resumed_from,
            "final_loss": log.last.get("loss"),
            "final_fm_loss": log.last.get("fm_loss"),
            "final_und_loss": log.last.get("und_loss"),
            "samples_per_s": (samples_seen - samples_before) / loop_s if steps_run else None,
            "samples_seen": samples_seen,
            "wall_s": log.wall_before + loop_s,
            "total_s": time.perf_counter() - t_start,
            "setup_s": setup_s,
            "engine_init_s": engine_init_s,
            "num_ranks": world,
            "global_batch": sharding.global_batch if train.max_tokens_per_micro_batch is None else None,
            "max_tokens_per_micro_batch": train.max_tokens_per_micro_batch,
            "zero_stage": train.zero_stage,
            "precision": precision,
            "activation_checkpointing": train.activation_checkpointing,
            "trainable_params": n_trainable,
            "total_params": n_total,
            "rank_weight_checksums": checksums,
            "checkpoint": str(out_dir),
            "metrics": str(out_dir / METRICS),
        }
        if rank == 0:
            (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        dist.barrier()
        return summary
    finally:
        batches.close()  # stops the loader's worker processes
        bar.close()
        if live is not None:
            live.close()
        on_accelerator = eng.device.type != "cpu"
        eng.destroy()
        del eng
        if on_accelerator:  # the next stage of this process needs the memory now, not at the next GC
            gc.collect()
            ds_engine.accelerator().empty_cache()
