"""The training loop both recipes share (model.train: a Scone stage; model.srum_train: a SRUM round).

A recipe sets up what is its own (the model and its freezing, the loss module, the data, the run settings) and
hands them to `train_loop`, which owns everything else, identically for every recipe:

- the DeepSpeed engine (model.engine) over the loss module, resumed from `out_dir/ds_state` when a saved state is
  there (loaded weights-only, model.safe_state), and the weights' moving average (model.ema, train.ema_decay);
- the steps: grad_accum micro batches each, moved to the engine's device and dtype (`to_device`), each with its
  flow-matching noise seeded by its place in the global batch only (`noise_seed`), so a resumed run, or another
  split of the same global batch over ranks, draws the same noise and ends on the same weights;
- every train.log_every steps a row of `metrics.jsonl` (`MetricsLog`: the recipe's losses as means over the
  global batch, lr, grad_norm before clipping, samples_per_s, wall_s, samples_seen), streamed live to MLflow
  (model.live_metrics) and shown on the progress bar;
- every train.save_every steps the resumable state: DeepSpeed's, the EMA's, the step and the data's position
  (`StepData.state`) as client state;
- at the end the final weights (model.final_weights.save_final_weights, the EMA's when there is one), the
  tokenizer, and `train_summary.json`, written last: it marks the run finished (model.run_identity).

The loss module holds the model as `.model` (what is saved) and is called as `module(*inputs, generator=gen)`,
returning a dict of tensors with at least the recipe's `losses` (the first is backpropagated).
"""
from __future__ import annotations

import gc
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from data.formats.jsonl import ignore_bad_line, read_jsonl
from model import engine as ds_engine
from model.config import StageConfig, TrainConfig
from model.data_loader import Sharding
from model.ema import WeightEMA
from model.final_weights import save_final_weights
from model.run_identity import METRICS, STATE_DIR, SUMMARY


def noise_seed(seed: int, step: int, chunk: int) -> int:
    """Seed of the flow-matching noise of one micro batch: a function of its place in the global batch only,
    so a resumed run, or a different split of the same global batch over ranks, draws the same noise."""
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1)[0])


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """A collated batch's tensors on `device`, floating ones in `dtype`; its other entries (sample layouts,
    settings) as they are."""
    return {k: _moved(v, device, dtype) for k, v in batch.items()}


def _moved(value, device, dtype: torch.dtype):
    if isinstance(value, dict):
        return to_device(value, device, dtype)
    if torch.is_tensor(value):
        value = value.to(device)
        if value.is_floating_point():
            value = value.to(dtype)  # bf16 engines hold bf16 weights; inputs must match
    return value


def numel(p: nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned weight is empty outside a gather


class StepData(Protocol):
    """A recipe's data as the loop reads it."""

    samples: int  # samples this rank has been served in this run

    def micro_batch(self, step: int, micro: int) -> tuple:
        """The loss module's positional inputs for micro batch `micro` of step `step` (steps in order)."""

    def state(self) -> dict:
        """Client state a resumed run needs (every rank calls it: it may be a collective)."""

    def restore(self, client: dict) -> None:
        """Continue from the client state of a saved step (called before the first micro batch)."""

    def close(self) -> None: ...


class MetricsLog:
    """metrics.jsonl of rank 0: one row per logged step, the throughput measured since the previous row.

    `rows` are the rows of the whole run (rank 0 re-reads those kept from before a resume; other ranks have
    this process's only)."""

    def __init__(self, path: Path, *, start_step: int, wall_before: float, samples_before: int, write: bool,
                 losses: tuple[str, ...] = ("loss", "fm_loss", "und_loss")):
        self.path, self.write, self.losses = path, write, losses
        self.wall_before = wall_before
        self.t0 = self.t_prev = time.perf_counter()
        self.samples_prev = samples_before  # packed micro batches hold varying sample counts: count, not multiply
        self.last: dict = {}
        self.rows: list[dict] = []
        if write and path.exists():
            # rows after the resumed state are about to be recomputed; a row cut short by a crash goes too
            self.rows = [r for r in read_jsonl(path, ignore_bad_line) if r["step"] <= start_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def log(self, step: int, losses: torch.Tensor, lr: float, grad_norm, samples_seen: int) -> dict:
        now = time.perf_counter()
        self.last = {
            "step": step,
            **{name: float(value) for name, value in zip(self.losses, losses)},
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": (samples_seen - self.samples_prev) / max(now - self.t_prev, 1e-9),
            "wall_s": self.wall_s(),
            "samples_seen": samples_seen,
        }
        self.t_prev, self.samples_prev = now, samples_seen
        self.rows.append(self.last)
        if self.write:
            with self.path.open("a") as f:
                f.write(json.dumps(self.last) + "\n")
        return self.last


def save_state(eng, state_dir: Path, step: int, client_state: dict, rank: int, ema: WeightEMA | None) -> None:
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


def all_gather(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _sum_over_ranks(value: int, device) -> int:
    import torch.distributed as dist

    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total[0])


@dataclass
class Run:
    """One run of a recipe on this rank, as its setup leaves it."""

    name: str  # progress bar, printed lines and the summary's "stage"
    out_dir: Path
    train: TrainConfig  # grad_accum, seed, log_every, save_every, zero_stage, ema_decay, max_shard_bytes
    stage: StageConfig  # steps and the LR schedule
    rank: int
    world: int
    precision: str  # resolved: "fp32" or "bf16"
    losses: tuple[str, ...]  # the loss module's outputs logged, first the one backpropagated
    t_start: float  # when the recipe started (summary: setup_s, total_s)
    progress: bool = True
    live_metrics: dict | None = None  # {"tracking_uri", "run_id"} (model.live_metrics) or None

    @property
    def sharding(self) -> Sharding:
        return Sharding(self.train.micro_batch, self.train.grad_accum, self.world, self.rank)


def train_loop(run: Run, module: nn.Module, trainable: list[nn.Parameter], data: StepData, tokenizer: Any, *,
               configure: Callable[[Any], None] | None = None,
               summary: Callable[[dict, list[dict]], dict] | None = None) -> dict:
    """Train `module`'s `trainable` parameters for run.stage.steps steps on `data`, save, and return the summary.

    `configure(engine)` adjusts the engine before a saved state is loaded into it; `summary(base, rows)` returns
    the recipe's summary from the shared fields and the metrics rows. Every rank calls it; `data` is closed."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from model.live_metrics import open_live_metrics
    from model.safe_state import load_engine_state

    train, out_dir, rank, world, steps = run.train, run.out_dir, run.rank, run.world, run.stage.steps
    state_dir = out_dir / STATE_DIR
    bar = live = eng = None
    try:
        t_engine = time.perf_counter()
        eng = ds_engine.build_engine(module, trainable, train, run.stage, world_size=world, precision=run.precision)
        if configure is not None:
            configure(eng)
        eng.train()  # from_pretrained hands back a model in eval mode (no condition dropout)
        resuming = (state_dir / "latest").exists()
        client: dict = (load_engine_state(eng, state_dir)[1] or {}) if resuming else {}
        ema = WeightEMA(trainable, train.ema_decay) if train.ema_decay else None
        if ema is not None and resuming:
            ema.load(state_dir / (state_dir / "latest").read_text().strip() / f"ema_rank{rank}.pt")
        engine_init_s = time.perf_counter() - t_engine
        step = resumed_from = int(client.get("step", 0))
        samples_before = int(client.get("samples_seen", 0))
        if step:
            data.restore(client)
        dtype = torch.bfloat16 if run.precision == "bf16" else torch.float32
        sharding = run.sharding

        log = MetricsLog(out_dir / METRICS, start_step=step, wall_before=float(client.get("train_wall_s", 0.0)),
                         samples_before=samples_before, write=rank == 0, losses=run.losses)
        live = open_live_metrics(run.live_metrics) if rank == 0 else None
        setup_s = time.perf_counter() - run.t_start
        bar = tqdm(total=steps, initial=step, desc=run.name, unit="step", disable=not (run.progress and rank == 0))
        while step < steps:
            lr = float(eng.get_lr()[0])
            losses = torch.zeros(len(run.losses), dtype=torch.float64, device=eng.device)
            for micro in range(train.grad_accum):
                seed = noise_seed(train.seed, step, sharding.chunk(micro))
                torch.manual_seed(seed)  # covers any randomness the model draws outside the generator
                gen = torch.Generator(device=eng.device).manual_seed(seed)
                out = eng(*(_moved(x, eng.device, dtype) for x in data.micro_batch(step, micro)), generator=gen)
                eng.backward(out[run.losses[0]])
                eng.step()
                losses += torch.stack([out[k].detach().double() for k in run.losses])
            if ema is not None:
                ema.update()
            step += 1
            bar.update(1)
            if step % train.log_every == 0 or step == steps:
                # with the samples every rank has served: a packed step's sample count is known only by summing
                totals = torch.cat([losses, torch.tensor([float(data.samples)], dtype=torch.float64,
                                                         device=eng.device)])
                dist.all_reduce(totals)
                row = log.log(step, totals[:-1].cpu() / (train.grad_accum * world), lr, eng.get_global_grad_norm(),
                              samples_before + int(totals[-1]))
                if live is not None:
                    live(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if run.progress and rank == 0:  # a plain line too: orchestrators (Prefect's log_prints) log prints
                    print(f"{run.name}: step {step}/{steps} loss {row['loss']:.4f} "
                          f"({row['samples_per_s']:.1f} samples/s)", flush=True)
            if step % train.save_every == 0 and step < steps:
                client = {"step": step, **data.state(),
                          "samples_seen": samples_before + _sum_over_ranks(data.samples, eng.device),
                          "train_wall_s": log.wall_s()}
                save_state(eng, state_dir, step, client, rank, ema)
        loop_s = time.perf_counter() - log.t0
        data.state()  # the data's last word (the stage pools its decode failures into out_dir/quarantine)
        samples_seen = samples_before + _sum_over_ranks(data.samples, eng.device)
        bar.close()

        with ema.swapped_in() if ema is not None else nullcontext():  # a release ships the average
            checksum = save_final_weights(eng.module.model, out_dir, train.zero_stage, rank, train.max_shard_bytes)
        checksums = all_gather(checksum)
        if rank == 0:
            tokenizer.save_pretrained(out_dir)
        steps_run = step - resumed_from
        base = {
            "stage": run.name,
            "steps": step,
            "steps_this_run": steps_run,
            "resumed_from_step": resumed_from,
            **{f"final_{k}": log.last.get(k) for k in run.losses},
            "samples_per_s": (samples_seen - samples_before) / loop_s if steps_run else None,
            "samples_seen": samples_seen,
            "wall_s": log.wall_before + loop_s,
            "total_s": time.perf_counter() - run.t_start,
            "setup_s": setup_s,
            "engine_init_s": engine_init_s,
            "num_ranks": world,
            "zero_stage": train.zero_stage,
            "precision": run.precision,
            "trainable_params": sum(numel(p) for p in trainable),
            "total_params": sum(numel(p) for p in eng.module.model.parameters()),
            "rank_weight_checksums": checksums,
            "checkpoint": str(out_dir),
            "metrics": str(out_dir / METRICS),
        }
        result = summary(base, log.rows) if summary is not None else base
        if rank == 0:
            (out_dir / SUMMARY).write_text(json.dumps(result, indent=2) + "\n")
        dist.barrier()
        return result
    finally:
        data.close()  # the stage's loader worker processes
        if bar is not None:
            bar.close()
        if live is not None:
            live.close()
        if eng is not None:
            on_accelerator = eng.device.type != "cpu"
            eng.destroy()
            del eng
            if on_accelerator:  # the next run of this process needs the memory now, not at the next GC
                gc.collect()
                ds_engine.accelerator().empty_cache()
