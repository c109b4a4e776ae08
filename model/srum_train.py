"""Reward-weighted training of one SRUM round (SRUM Sec. 3.3, recipe of Table 6 scaled down).

Each candidate is one prompt, the image the model generated for it, its dense reward map on the latent grid
and the prompt's ground-truth image. A step draws `micro_batch` candidates per rank and runs ONE forward
pass over 2 x micro_batch sequences (the self-generated targets, then their ground-truth references, under
the same prompt) and minimises L_r + lambda_c * L_ref (model.srum_loss). The DeepSpeed engine is the stage
trainer's (model.engine): AdamW with the SRUM betas and eps, constant LR after a linear warm-up, gradient
clipping, fp32 on CPU / bf16 on GPUs; freezing follows model.train.apply_freezing (generation expert by
default, see SrumConfig.train_understanding).

The checkpoint is a BAGEL release directory (model.pipeline.is_release_dir), loaded by model.bagel.family, its
batches collated by the family and its loss computed by model.bagel.srum.BagelSrumLoss (one packed forward)
(`load_round_model`).

`train_srum_round` writes into `out_dir`, like model.train.train_stage does for a stage:
- the checkpoint at `out_dir` itself, a release directory with its `config.json` marker;
- `metrics.jsonl`: one line per step {step, loss, l_r, l_ref, lr, grad_norm};
- `train_summary.json`, written last.
"""
from __future__ import annotations

import json
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from model import engine as ds_engine
from model.batching import Example
from model.config import ModelConfig, SrumConfig, StageConfig, TrainConfig

METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
SRUM_DATASET = "srum_self_generated"  # label only: the data are the round's candidates, held in memory


class SrumCandidate(NamedTuple):
    example: Example  # the prompt: references (none for text-to-image) and instruction
    image: np.ndarray  # uint8 H x W x 3, what the model generated for it
    reward: np.ndarray  # [rows, cols] reward map on the latent grid (model.reward_map.to_latent_grid)
    reference: np.ndarray  # uint8 H x W x 3, the prompt's ground-truth image (target of L_ref)


def srum_stage(srum: SrumConfig) -> StageConfig:
    """The round as a stage for the engine builder: constant LR after warm-up, generation expert trained."""
    return StageConfig(
        datasets=[SRUM_DATASET], init_from=None, steps=srum.steps, lr=srum.lr, warmup_steps=srum.warmup_steps,
        schedule="constant", train_understanding=srum.train_understanding, train_generation=True,
        bridge=srum.bridge, und_loss_weight=0.0,
    )


def srum_train_config(srum: SrumConfig, base: TrainConfig | None = None) -> TrainConfig:
    """Optimiser settings from the SRUM recipe; ZeRO stage and precision from the pipeline's `train:` section."""
    stage = srum_stage(srum)
    return TrainConfig(
        num_ranks=1, zero_stage=base.zero_stage if base else 2, micro_batch=srum.micro_batch, grad_accum=1,
        grad_clip=srum.grad_clip, precision=base.precision if base else "auto", weight_decay=srum.weight_decay,
        betas=srum.betas, seed=srum.seed, log_every=1, save_every=max(srum.steps, 1), stages={"srum": stage},
    )


def _torch_optimizers(opt) -> list[torch.optim.Optimizer]:
    """The torch optimizer(s) inside whatever DeepSpeed wrapped around ours (ZeRO keeps it as `.optimizer`)."""
    seen, out = set(), []
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            out.append(opt)
        opt = getattr(opt, "optimizer", None)
    return out


def set_adam_eps(eng, eps: float) -> None:
    # model.engine's AdamW takes no eps; SRUM needs 1e-15 (Table 6), and AdamW reads it from the
    # param groups at every step, so setting it there is exact.
    optimizers = _torch_optimizers(eng.optimizer)
    if not optimizers:
        raise RuntimeError(f"no torch optimizer inside {type(eng.optimizer).__name__}; cannot set AdamW eps")
    for opt in optimizers:
        for group in opt.param_groups:
            group["eps"] = eps


def _batch_order(n: int, need: int, seed: int) -> np.ndarray:
    """Candidate indices for `need` draws: shuffled epochs one after another (deterministic in seed)."""
    rng = np.random.default_rng(seed)
    epochs = -(-need // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:need]


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (int(grid), int(grid)) if isinstance(grid, numbers.Integral) else (int(grid[0]), int(grid[1]))


def _check_candidates(candidates: Sequence, grid: int | tuple[int, int]) -> list[SrumCandidate]:
    rows, cols = _grid(grid)
    out = []
    for i, c in enumerate(candidates):
        c = SrumCandidate(*c)
        reward = np.asarray(c.reward, dtype=np.float32)
        if reward.shape != (rows, cols):
            raise ValueError(
                f"candidate {i}: reward map of shape {reward.shape}, the model's latent grid is {rows}x{cols}; "
                f"resize it with model.reward_map.to_latent_grid(map, ({rows}, {cols}))"
            )
        if not np.isfinite(reward).all():
            raise ValueError(f"candidate {i}: the reward map has non-finite values")
        out.append(c._replace(reward=reward))
    if not out:
        raise ValueError("train_srum_round needs at least one candidate (prompt, image, reward map, reference)")
    return out


@dataclass
class RoundModel:
    """The checkpoint as the round's loop uses it."""

    model: nn.Module  # has expert_parameters and save_pretrained(out_dir, state_dict=...)
    tokenizer: Any  # has save_pretrained(out_dir)
    grid: tuple[int, int]  # latent (rows, cols) of the training targets: the reward maps' shape
    collate: Callable[[list[Example]], dict]
    loss: nn.Module  # (batch, reward [B, rows, cols], generator) -> {"loss", "l_r", "l_ref"}
    layout: str


def bagel_data_config(bagel_cfg, model_cfg: ModelConfig | None) -> ModelConfig:
    """The data-side settings the BAGEL family's collate reads (image side, references, timestep sampling,
    guidance dropout) and the bridge settings, none of which a release stores: `model_cfg`'s, or without it
    the project defaults at the side the model generates at (model.pipeline.BagelPipeline.image_size)."""
    if model_cfg is not None:
        return model_cfg
    from model.bagel.family import image_side

    return ModelConfig().model_copy(update={"image_size": image_side(bagel_cfg, bagel_cfg.vit.image_size)})


def load_round_model(model_dir: str | Path, srum_cfg: SrumConfig, model_cfg: ModelConfig | None) -> RoundModel:
    from model.bagel import family
    from model.bagel.srum import BagelSrumLoss
    from model.pipeline import is_release_dir

    model_dir = Path(model_dir)
    if not is_release_dir(model_dir):
        raise ValueError(f"{model_dir} is not a BAGEL release directory (no llm_config.json / vit_config.json); "
                         "a SRUM round trains a checkpoint of the chain's stages or a downloaded release")
    model = family.load(model_dir)
    tokenizer = family.tokenizer(model_dir)
    data_cfg = bagel_data_config(model.config, model_cfg)
    side = family.image_side(model.config, data_cfg.image_size)
    loss = BagelSrumLoss(model, bridge=data_cfg.bridge if srum_cfg.bridge else None, alpha=srum_cfg.alpha,
                         lambda_c=srum_cfg.lambda_c, weighting=srum_cfg.reward_weighting)
    return RoundModel(model, tokenizer, model.bagel.latent_grid(side, side),
                      lambda ex: family.collate(ex, tokenizer, data_cfg), loss, "bagel-release")


def train_srum_round(
    model_dir: str | Path,
    candidates: Sequence[SrumCandidate | tuple],
    srum_cfg: SrumConfig,
    model_cfg: ModelConfig | None,
    out_dir: str | Path,
    *,
    train: TrainConfig | None = None,
    progress: bool = False,
    live_metrics: dict | None = None,
) -> dict:
    """Train `model_dir`'s checkpoint on one round of scored candidates; return the summary.

    `live_metrics` ({"tracking_uri", "run_id"}) streams each step's row to that MLflow run (model.live_metrics).

    `model_cfg` (optional): the data-side and bridge settings the release does not store (`bagel_data_config`);
    the architecture is the release's.
    `train` supplies ZeRO stage and precision (defaults: ZeRO-2, auto precision -> fp32 on CPU).
    """
    from tqdm.auto import tqdm

    from model.train import _final_weights, apply_freezing, to_device

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    rm = load_round_model(model_dir, srum_cfg, model_cfg)
    model, tokenizer = rm.model, rm.tokenizer
    cands = _check_candidates(candidates, rm.grid)

    rank, world = ds_engine.init_distributed()
    train_cfg = srum_train_config(srum_cfg, train)
    stage = train_cfg.stages["srum"]
    precision = ds_engine.resolve_precision(train_cfg.precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(srum_cfg.seed)
    trainable = apply_freezing(model, stage)
    eng = ds_engine.build_engine(rm.loss, trainable, train_cfg, stage, world_size=world, precision=precision)
    set_adam_eps(eng, srum_cfg.eps)
    eng.train()

    mb = srum_cfg.micro_batch
    order = _batch_order(len(cands), srum_cfg.steps * world * mb, srum_cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS
    if rank == 0:
        metrics_path.write_text("")
    history: list[dict] = []
    from model.live_metrics import open_live_metrics

    live = open_live_metrics(live_metrics) if rank == 0 else None
    bar = tqdm(total=srum_cfg.steps, desc="srum", unit="step", disable=not (progress and rank == 0))
    t_loop = time.perf_counter()
    try:
        for step in range(srum_cfg.steps):
            lr = float(eng.get_lr()[0])
            start = (step * world + rank) * mb
            chosen = [cands[i] for i in order[start : start + mb]]
            examples = [Example(refs=c.example.refs, instruction=c.example.instruction, target=c.image) for c in chosen]
            examples += [Example(refs=c.example.refs, instruction=c.example.instruction, target=c.reference) for c in chosen]
            batch = to_device(rm.collate(examples), eng.device, dtype)
            reward = torch.from_numpy(np.stack([c.reward for c in chosen])).to(eng.device, dtype)
            seed = int(np.random.SeedSequence([srum_cfg.seed, step, rank]).generate_state(1)[0])
            torch.manual_seed(seed)
            gen = torch.Generator(device=eng.device).manual_seed(seed)
            out = eng(batch, reward, generator=gen)
            eng.backward(out["loss"])
            eng.step()
            values = torch.tensor([float(out[k].detach().float()) for k in ("loss", "l_r", "l_ref")], dtype=torch.float64)
            if world > 1:
                import torch.distributed as dist

                values = values.to(eng.device)
                dist.all_reduce(values)
                values = values.cpu() / world
            grad_norm = eng.get_global_grad_norm()
            row = {"step": step + 1, "loss": float(values[0]), "l_r": float(values[1]), "l_ref": float(values[2]),
                   "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm)}
            history.append(row)
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if live is not None:
                    live(row)
            bar.update(1)
        loop_s = time.perf_counter() - t_loop
        state, _ = _final_weights(eng.module.model, train_cfg.zero_stage, rank)
        if rank == 0:
            # a checkpoint left in out_dir by an earlier run is replaced whole: a release refuses to be written
            # over weights, and shards of another split would outlive it
            for stale in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.safetensors.index.json")]:
                stale.unlink()
            model.save_pretrained(out_dir, state_dict=state)
            tokenizer.save_pretrained(out_dir)
        summary = {
            "stage": "srum",
            "init_checkpoint": str(model_dir),
            "checkpoint_layout": rm.layout,
            "steps": srum_cfg.steps,
            "candidates": len(cands),
            "micro_batch": mb,
            "num_ranks": world,
            "final_loss": history[-1]["loss"],
            "final_l_r": history[-1]["l_r"],
            "final_l_ref": history[-1]["l_ref"],
            "mean_loss": float(np.mean([h["loss"] for h in history])),
            "lr": srum_cfg.lr,
            "adam_eps": srum_cfg.eps,
            "lambda_c": srum_cfg.lambda_c,
            "alpha": srum_cfg.alpha,
            "reward_weighting": srum_cfg.reward_weighting,
            "precision": precision,
            "zero_stage": train_cfg.zero_stage,
            "trainable_params": sum(p.numel() for p in trainable),
            "wall_s": loop_s,
            "total_s": time.perf_counter() - t_start,
            "checkpoint": str(out_dir),
            "metrics": str(metrics_path),
        }
        if rank == 0:
            (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        return summary
    finally:
        bar.close()
        if live is not None:
            live.close()
        eng.destroy()
