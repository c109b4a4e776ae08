"""DeepSpeed engine for stage training: distributed init, the config dict, AdamW and the LR schedule.

One code path for both scales: on a CPU-only machine DeepSpeed picks its CPU accelerator and the gloo
backend, precision "auto" resolves to fp32; on GPUs the accelerator is CUDA (NCCL) and "auto" means bf16.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from typing import Callable

import torch

from model.config import StageConfig, TrainConfig

# The ranks' environment that torchrun sets; an in-process single rank gets it from `ensure_rank_env`.
RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def _quiet_deepspeed() -> None:
    # DeepSpeed logs its whole config at INFO on every initialize; the metrics file is our record.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on an accelerator that supports it, else 'fp32' (CPU training stays fp32)."""
    if precision != "auto":
        return precision
    acc = accelerator()
    if acc.device_name() != "cpu" and acc.is_bf16_supported():
        return "bf16"
    return "fp32"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_rank_env() -> None:
    """Give a process not started by torchrun the environment of rank 0 of a world of one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def init_distributed() -> tuple[int, int]:
    """Initialise the process group once per process (later stages in the same process reuse it).

    Returns (rank, world_size).
    """
    import deepspeed
    import torch.distributed as dist

    _quiet_deepspeed()
    if not dist.is_initialized():
        ensure_rank_env()
    # Also called when torch.distributed is already up: DeepSpeed then only wraps the existing group.
    deepspeed.init_distributed(dist_backend=accelerator().communication_backend_name(), verbose=False)
    return dist.get_rank(), dist.get_world_size()


def lr_multiplier(step: int, *, steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the stage's peak LR for optimizer step `step` (0-based).

    Linear warm-up reaches the peak at step warmup_steps - 1; after it, "constant" holds the peak and
    "cosine" decays it along half a cosine that would reach zero at step `steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        decay_steps = max(1, steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule {schedule!r}: expected 'cosine' or 'constant'")


def deepspeed_config(train: TrainConfig, *, world_size: int, precision: str) -> dict:
    # No stage3_gather_16bit_weights_on_model_save: the final weights are gathered group by group by
    # model.final_weights.save_final_weights, never whole through engine.save_16bit_model.
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3 and train.zero3_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = train.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # Our optimizer is torch's AdamW (runs on every accelerator without compiling DeepSpeed ops);
        # DeepSpeed only vouches for its own optimizers under ZeRO, hence the opt-in.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def adamw(train: TrainConfig, lr: float) -> Callable:
    def build(params):
        return torch.optim.AdamW(params, lr=lr, betas=tuple(train.betas), weight_decay=train.weight_decay)

    return build


def lambda_schedule(stage: StageConfig) -> Callable:
    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_multiplier(s, steps=stage.steps, warmup_steps=stage.warmup_steps, schedule=stage.schedule),
        )

    return build


def build_engine(module: torch.nn.Module, params: list[torch.nn.Parameter], train: TrainConfig,
                 stage: StageConfig, *, world_size: int, precision: str):
    """Wrap `module` in a DeepSpeed engine optimising `params` only (the trainable experts).

    The optimizer and scheduler are built by DeepSpeed from callables, so they sit on its own optimizer
    and are saved and restored with `engine.save_checkpoint` / `load_checkpoint`.
    """
    import deepspeed

    _quiet_deepspeed()
    if not params:
        raise ValueError("no trainable parameters: the stage freezes every expert "
                         "(set train_understanding or train_generation to true)")
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=adamw(train, stage.lr),
        lr_scheduler=lambda_schedule(stage),
        config=deepspeed_config(train, world_size=world_size, precision=precision),
        dist_init_required=False,
    )
    return engine
