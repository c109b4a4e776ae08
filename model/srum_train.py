"""The SRUM round recipe: reward-weighted training of one round (SRUM Sec. 3.3, recipe of Table 6 scaled down).

Each candidate is one prompt, the image the model generated for it, its dense reward map on the latent grid
and the prompt's ground-truth image. A step draws `micro_batch` candidates per rank (`RoundData`: shuffled epochs
of the candidates, deterministic in the seed) and runs ONE forward pass over 2 x micro_batch sequences (the
self-generated targets, then their ground-truth references, under the same prompt) and minimises
L_r + lambda_c * L_ref (model.srum_loss). The engine is the stage trainer's (model.engine): AdamW with the SRUM
betas and eps, constant LR after a linear warm-up, gradient clipping, fp32 on CPU / bf16 on GPUs; freezing follows
model.train.apply_freezing (generation expert by default, see SrumConfig.train_understanding).

The checkpoint is a BAGEL release directory (model.pipeline.is_release_dir), loaded by model.bagel.family, its
batches collated by the family and its loss computed by model.bagel.srum.BagelSrumLoss (one packed forward)
(`load_round_model`).

Only the setup, the batch and the loss are the round's own: the steps, the noise seeding, the metrics log, the
resumable state, the final save (model.final_weights: streamed, in the release's dtype and shards) and the summary
are the loop every recipe shares (model.training), so `train_srum_round` writes into `out_dir` what
model.train.train_stage writes for a stage:
- the checkpoint at `out_dir` itself, a release directory with its `config.json` marker;
- `metrics.jsonl`: one line per step {step, loss, l_r, l_ref, lr, grad_norm, samples_per_s, wall_s, samples_seen};
- `ds_state/`: resumable state every train.save_every steps (the pipeline's `train:` section), and
  `run_settings.json` (`round_settings`): a killed round re-run with the same candidates and settings resumes
  and ends on the weights of an uninterrupted one; with other settings it starts afresh (model.run_identity);
- `train_summary.json`, written last: a finished round re-run with the same settings returns it unchanged.
"""
from __future__ import annotations

import hashlib
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
from model.data_loader import Sharding
from model.run_identity import METRICS, SUMMARY, claim_run, code_digest, train_settings, weights_digest  # noqa: F401
from model.training import Run, train_loop

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
    """Optimiser settings from the SRUM recipe; ZeRO stage, precision, the resumable state's interval and the
    release's shard size from the pipeline's `train:` section (without it: no state before the end)."""
    stage = srum_stage(srum)
    return TrainConfig(
        num_ranks=1, zero_stage=base.zero_stage if base else 2, micro_batch=srum.micro_batch, grad_accum=1,
        grad_clip=srum.grad_clip, precision=base.precision if base else "auto", weight_decay=srum.weight_decay,
        betas=srum.betas, seed=srum.seed, log_every=1, save_every=base.save_every if base else max(srum.steps, 1),
        stages={"srum": stage},
        **({"max_shard_bytes": base.max_shard_bytes} if base else {}),
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

    model: nn.Module  # has expert_parameters and weights_writer (model.final_weights.save_final_weights)
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


def candidates_digest(candidates: Sequence[SrumCandidate | tuple]) -> str:
    """Content identity of a round's candidates (prompt, references, image, reward map, reference image, in order):
    the round's data, as the data files' digests are a stage's."""
    h = hashlib.sha256()
    for c in candidates:
        c = SrumCandidate(*c)
        h.update(f"{c.example.instruction}\0{len(c.example.refs)}\0".encode())
        for a in (*c.example.refs, c.image, np.asarray(c.reward, dtype=np.float32), c.reference):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:20]


def round_settings(model_dir: str | Path, candidates: Sequence, srum_cfg: SrumConfig, model_cfg: ModelConfig | None,
                   train_cfg: TrainConfig, world_size: int) -> dict:
    """Everything the round's result depends on (model.run_identity): the recipe, the init weights by content,
    the candidates by content, the model code."""
    return {
        "recipe": "srum",
        # how candidates are made and judged (rounds, candidates, judge) shows in their digest
        "srum": srum_cfg.model_dump(mode="json", exclude={"rounds", "candidates", "judge"}),
        "train": train_settings(train_cfg),
        "model": None if model_cfg is None else model_cfg.model_dump(mode="json"),
        "world_size": world_size,
        "init_weights": weights_digest(Path(model_dir)),
        "candidates": candidates_digest(candidates),
        "code": code_digest(),
    }


class RoundData:
    """The round's candidates as the loop reads them: micro batch `micro` of step `step` on this rank is the
    `micro_batch` candidates at its place in the global batch of `_batch_order`, each twice (its image, then its
    reference, as the target), with their reward maps. The place is a function of the step alone, so a resumed
    round needs no data state."""

    def __init__(self, candidates: list[SrumCandidate], collate: Callable[[list[Example]], dict], sharding: Sharding,
                 steps: int, seed: int):
        self.candidates, self.collate, self.sharding = candidates, collate, sharding
        self.order = _batch_order(len(candidates), steps * sharding.lanes * sharding.micro_batch, seed)
        self.samples = 0

    def micro_batch(self, step: int, micro: int) -> tuple[dict, torch.Tensor]:
        mb = self.sharding.micro_batch
        start = (step * self.sharding.lanes + self.sharding.chunk(micro)) * mb
        chosen = [self.candidates[i] for i in self.order[start : start + mb]]
        examples = [Example(refs=c.example.refs, instruction=c.example.instruction, target=c.image) for c in chosen]
        examples += [Example(refs=c.example.refs, instruction=c.example.instruction, target=c.reference)
                     for c in chosen]
        self.samples += len(chosen)
        return self.collate(examples), torch.from_numpy(np.stack([c.reward for c in chosen]))

    def state(self) -> dict:
        return {}

    def restore(self, client: dict) -> None:
        pass

    def close(self) -> None:
        pass


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
    `train` supplies ZeRO stage, precision, the state interval and the shard size (defaults: ZeRO-2, auto precision
    -> fp32 on CPU, no state before the end).
    """
    from model.train import apply_freezing

    t_start = time.perf_counter()
    out_dir, candidates = Path(out_dir), list(candidates)
    rank, world = ds_engine.init_distributed()
    train_cfg = srum_train_config(srum_cfg, train)
    settings = round_settings(model_dir, candidates, srum_cfg, model_cfg, train_cfg, world)
    done = claim_run(out_dir, settings, rank, on_mismatch="restart")
    if done is not None:
        return done
    stage = train_cfg.stages["srum"]
    run = Run("srum", out_dir, train_cfg, stage, rank, world, ds_engine.resolve_precision(train_cfg.precision),
              ("loss", "l_r", "l_ref"), t_start, progress, live_metrics)

    torch.manual_seed(srum_cfg.seed)
    rm = load_round_model(model_dir, srum_cfg, model_cfg)
    cands = _check_candidates(candidates, rm.grid)
    trainable = apply_freezing(rm.model, stage)
    data = RoundData(cands, rm.collate, run.sharding, srum_cfg.steps, srum_cfg.seed)

    def summary(base: dict, rows: list[dict]) -> dict:
        return {
            **base,
            "init_checkpoint": str(model_dir),
            "checkpoint_layout": rm.layout,
            "candidates": len(cands),
            "micro_batch": srum_cfg.micro_batch,
            "mean_loss": float(np.mean([r["loss"] for r in rows])),
            "lr": srum_cfg.lr,
            "adam_eps": srum_cfg.eps,
            "lambda_c": srum_cfg.lambda_c,
            "alpha": srum_cfg.alpha,
            "reward_weighting": srum_cfg.reward_weighting,
        }

    return train_loop(run, rm.loss, trainable, data, rm.tokenizer,
                      configure=lambda eng: set_adam_eps(eng, srum_cfg.eps), summary=summary)
