"""Train one stage (Scone Stage I / II recipes are configuration: data mix, frozen experts, bridge, length).

`train_stage` runs on every rank of a torchrun world (or alone, in-process). It writes into `out_dir`:

- the final Hugging Face checkpoint at `out_dir` itself (`model.safetensors`, `config.json`, tokenizer files),
  so `SconeModel.from_pretrained(out_dir)` loads the stage's result;
- `metrics.jsonl`: one JSON object per logged step (rank 0): step, loss, fm_loss, und_loss (means over the
  global batch), lr, grad_norm (before clipping), samples_per_s, wall_s, samples_seen;
- `train_summary.json`: written last, it marks the stage finished (a re-run then returns it unchanged);
- `ds_state/`: resumable DeepSpeed state every `train.save_every` steps, with the step and the data-stream
  position as client state. A killed run re-run with the same arguments continues from there, with the
  same data order and the same per-step noise, so it ends on the weights of an uninterrupted run;
- `run_settings.json`: what the run depends on (configs, world size, the data files' contents, the init
  checkpoint's weights, the model code); resuming or re-running with other settings raises `RunSettingsMismatch`.

`out_dir` is the stage's working folder: the pipeline trains in `artifacts/work/train/<stage>` and publishes
only the finished weights (tasks/train_stage.py), so the resumable state never enters a DVC output. The state
is loaded without unpickling code (model.safe_state): a crafted pickle in `ds_state/` is refused.

The loop is model-agnostic: a `ModelFamily` (import path "module:attribute") supplies the model, the
tokenizer and the batching. The default is the Scone model of this package.
"""
from __future__ import annotations

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

from model import data_loader, engine as ds_engine
from model.config import BridgeConfig, ModelConfig, StageConfig, TrainConfig
from model.safe_state import file_digest

DEFAULT_FAMILY = "model.train:SCONE"
STATE_DIR = "ds_state"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
SETTINGS = "run_settings.json"
EXPERTS = ("understanding", "generation")


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


def _scone_build(cfg: ModelConfig, tokenizer) -> nn.Module:
    from model.modeling import SconeModel

    return SconeModel.from_model_config(cfg, vocab_size=len(tokenizer))


def _scone_load(path: Path) -> nn.Module:
    from model.modeling import SconeModel

    return SconeModel.from_pretrained(str(path))


def _scone_tokenizer(path: Path | None):
    from model.tokenizer import build_tokenizer, load_tokenizer

    return build_tokenizer() if path is None else load_tokenizer(path)


def _scone_examples(rows):
    from model.batching import examples_from_rows

    return examples_from_rows(rows)


def _scone_collate(examples, tokenizer, cfg):
    from model.batching import collate

    return collate(examples, tokenizer, cfg)


SCONE = ModelFamily(_scone_build, _scone_load, _scone_tokenizer, _scone_examples, _scone_collate)


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
        # Families whose config carries no bridge settings (BAGEL: a release's config) take params' model.bridge
        # per call; the Scone model has them in its own config (with_runtime_settings) and no such argument.
        takes = bridge and "bridge_config" in inspect.signature(model.training_loss).parameters
        self.bridge_config = bridge_config if takes else None

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        extra = {"bridge_straight_through": True} if self.bridge_straight_through else {}  # other families need not know it
        if self.bridge_config is not None:
            extra["bridge_config"] = self.bridge_config
        return self.model.training_loss(batch, bridge=self.bridge, und_loss_weight=self.und_loss_weight,
                                        generator=generator, **extra)


def apply_freezing(model: nn.Module, stage: StageConfig) -> list[nn.Parameter]:
    """requires_grad only on the experts the stage trains; everything else (ViT, latent encoder) is frozen.

    Returns the trainable parameters, in model order (what the optimizer gets).
    """
    wanted = {"understanding": stage.train_understanding, "generation": stage.train_generation}
    for p in model.parameters():
        p.requires_grad_(False)
    chosen: set[int] = set()
    for expert in EXPERTS:
        if wanted[expert]:
            chosen.update(id(p) for p in model.expert_parameters(expert))
    trainable = [p for p in model.parameters() if id(p) in chosen]
    for p in trainable:
        p.requires_grad_(True)
    if not trainable:
        raise ValueError("the stage trains no parameters: set train_understanding and/or train_generation to true")
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
    t = train.model_dump(mode="json", exclude={"stages", "num_ranks", "log_every", "save_every"})
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


def _to_device(batch: dict, device, dtype: torch.dtype) -> dict:
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

    def __init__(self, path: Path, *, start_step: int, wall_before: float, global_batch: int, write: bool):
        self.path, self.write = path, write
        self.global_batch = global_batch
        self.wall_before = wall_before
        self.t0 = self.t_prev = time.perf_counter()
        self.step_prev = start_step
        self.last: dict = {}
        if write and path.exists():  # rows after the resumed state are about to be recomputed
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            path.write_text("".join(ln + "\n" for ln in keep))

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
            "samples_per_s": (step - self.step_prev) * self.global_batch / max(now - self.t_prev, 1e-9),
            "wall_s": self.wall_s(),
            "samples_seen": samples_seen,
        }
        self.t_prev, self.step_prev = now, step
        if self.write:
            with self.path.open("a") as f:
                f.write(json.dumps(self.last) + "\n")
        return self.last


def _save_state(eng, state_dir: Path, step: int, client_state: dict, rank: int) -> None:
    import torch.distributed as dist

    tag = f"step{step:07d}"
    eng.save_checkpoint(str(state_dir), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0:  # keep only the newest state: older ones are never resumed from
        for old in state_dir.iterdir():
            if old.is_dir() and old.name.startswith("step") and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _final_weights(model: nn.Module, zero_stage: int, rank: int) -> tuple[dict[str, torch.Tensor] | None, float]:
    """(full fp32 state dict on rank 0, else None; this rank's checksum of the full weights).

    ZeRO-3 holds one shard per rank: the weights are gathered for the copy. The checksums let the caller see
    that every rank ended on the same weights."""
    import contextlib

    import deepspeed

    params = list(model.parameters())
    gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3
                else contextlib.nullcontext())
    with gathered:
        checksum = float(sum(p.detach().double().sum() for p in params))
        state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()} if rank == 0 else None
    return state, checksum


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

    `init_checkpoint`: a checkpoint directory (the previous stage's out_dir) or None for fresh weights.
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
    model = family.load(init_checkpoint) if init_checkpoint else family.build(model_cfg, tokenizer)
    follow_params = getattr(getattr(model, "config", None), "with_runtime_settings", None)
    if init_checkpoint and follow_params is not None:  # families without the hook keep their saved config
        model.config = follow_params(model_cfg)
    trainable = apply_freezing(model, stage)
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    batches = data_loader.StageBatches(
        # rows that fail to decode are left out below data.quality.max_quarantine_fraction; rank 0 records them
        data_loader.load_examples(data_root, stage.datasets, family.examples_from_rows,
                                  max_quarantine_fraction=max_quarantine_fraction,
                                  quarantine_dir=out_dir / "quarantine" if rank == 0 else None),
        lambda examples: family.collate(examples, tokenizer, model_cfg),
        seed=train.seed,
        sharding=sharding,
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
    engine_init_s = time.perf_counter() - t_engine
    step = resumed_from = int(client.get("step", 0))
    position = int(client.get("data_position", 0))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    log = MetricsLog(out_dir / METRICS, start_step=step, wall_before=float(client.get("train_wall_s", 0.0)),
                     global_batch=sharding.global_batch, write=rank == 0)
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
                out = eng(_to_device(batches.micro_batch(position, micro), eng.device, dtype), generator=gen)
                eng.backward(out["loss"])
                eng.step()
                losses += torch.stack([out[k].detach().double() for k in ("loss", "fm_loss", "und_loss")])
            step += 1
            position += sharding.global_batch
            bar.update(1)
            if step % train.log_every == 0 or step == stage.steps:
                dist.all_reduce(losses)
                row = log.log(step, losses.cpu() / (train.grad_accum * world), lr, eng.get_global_grad_norm(),
                              position)
                if live is not None:
                    live(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if progress and rank == 0:  # a plain line too: orchestrators (Prefect's log_prints) log prints
                    print(f"{stage_name}: step {step}/{stage.steps} loss {row['loss']:.4f} "
                          f"({row['samples_per_s']:.1f} samples/s)", flush=True)
            if step % train.save_every == 0 and step < stage.steps:
                _save_state(eng, state_dir, step,
                            {"step": step, "data_position": position, "train_wall_s": log.wall_s()}, rank)
        loop_s = time.perf_counter() - log.t0
        bar.close()

        state, checksum = _final_weights(eng.module.model, train.zero_stage, rank)
        checksums = _all_gather(checksum)
        if rank == 0:
            model.save_pretrained(out_dir, state_dict=state)
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
            "samples_per_s": steps_run * sharding.global_batch / loop_s if steps_run else None,
            "samples_seen": position,
            "wall_s": log.wall_before + loop_s,
            "total_s": time.perf_counter() - t_start,
            "setup_s": setup_s,
            "engine_init_s": engine_init_s,
            "num_ranks": world,
            "global_batch": sharding.global_batch,
            "zero_stage": train.zero_stage,
            "precision": precision,
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
        bar.close()
        if live is not None:
            live.close()
        on_accelerator = eng.device.type != "cpu"
        eng.destroy()
        del eng
        if on_accelerator:  # the next stage of this process needs the memory now, not at the next GC
            gc.collect()
            ds_engine.accelerator().empty_cache()
