"""`scone bench train-throughput`: training-step speed and achieved FLOP/s against this machine's matmul peak.

One process, one DeepSpeed rank, the BAGEL family's stage loss on real batches from the built datasets (params'
micro batch, collated as the stage trainer collates them). The model is params' release (`model.release`, or the
`release` argument), else a fresh release of `model.preset` made in a temporary directory the way the chain makes
its own (a tokenizer trained on the datasets' texts, the preset's weights and autoencoder freshly initialised):
the speed of a step does not depend on what the weights have learned.

Measured in the same run: the fp32 (or bf16 on GPU) matmul peak, the FLOPs of one training step counted by
torch's FlopCounterMode (forward + backward), and the wall time of optimizer steps with the bridge off and on.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model import engine as ds_engine
from model.train import StageLoss, apply_freezing, to_device
from tasks.paths import STAGE2_FINAL

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params

DATASETS = ("scone_multi_candidate", "scone_single_candidate_refined")
STAGE = STAGE2_FINAL  # both experts trained: the most expensive recipe


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    """Best-of achieved FLOP/s of a square matmul: the machine's practical peak for this dtype."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(loss_module: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward + backward pass, counted operator by operator."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_module(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    loss_module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def fresh_release(params: Params, directory: Path) -> Path:
    """A release of params' preset with fresh weights, its tokenizer trained on the benchmark datasets' texts."""
    from model.bagel.autoencoder import FluxAutoencoder
    from model.bagel.autoencoder_train import save_autoencoder
    from model.bagel.bootstrap import assemble_release, subject_world_texts, train_tokenizer
    from model.bagel.config import preset

    seed = params.model.bootstrap.seed
    tokenizer_dir = train_tokenizer(subject_world_texts(params.data.root, DATASETS), directory / "tokenizer",
                                    params.model.bootstrap.tokenizer_vocab_size)
    vae = preset(params.model.preset).vae
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = FluxAutoencoder(vae)
    save_autoencoder(ae, vae, directory / "autoencoder")
    return assemble_release(tokenizer_dir, directory / "autoencoder", directory / "release",
                            preset_name=params.model.preset, seed=seed)


def _batches(params: Params, tokenizer, n: int) -> list[dict]:
    from data.formats.scone_s2i import iter_rows
    from model.bagel import family

    rows = []
    for name in DATASETS:
        rows += list(iter_rows(params.data.root, name))
    if not rows:
        raise FileNotFoundError(f"no training rows under {params.data.root}: run `scone data build all` first")
    mb = params.train.micro_batch
    return [family.collate(family.examples_from_rows([rows[(i * mb + j) % len(rows)] for j in range(mb)]),
                           tokenizer, params.model)
            for i in range(n)]


def _time_steps(eng, batches: list[dict], warmup: int) -> list[float]:
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        out = eng(batch, generator=torch.Generator(device=eng.device).manual_seed(i))
        eng.backward(out["loss"])
        eng.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run(params: Params, out: Path, steps: int = 20, warmup: int = 3, release: str | Path | None = None) -> dict:
    from model.bagel import family

    rank, world = ds_engine.init_distributed()
    precision = ds_engine.resolve_precision(params.train.precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device = torch.device(ds_engine.accelerator().device_name(), ds_engine.accelerator().current_device()) \
        if torch.cuda.is_available() else torch.device("cpu")
    release = release or params.model.release
    with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp:
        source = Path(release) if release else fresh_release(params, Path(tmp))
        tokenizer = family.tokenizer(source)
        batches = _batches(params, tokenizer, steps + warmup)
        stage = params.train.stages[STAGE]
        peak = matmul_peak_flops(dtype, device)
        results = {}
        for bridge in (False, True):
            torch.manual_seed(params.train.seed)
            model = family.load(source)
            trainable = apply_freezing(model, stage)
            loss_module = StageLoss(model, bridge=bridge, und_loss_weight=stage.und_loss_weight,
                                    bridge_config=params.model.bridge)
            flops = step_flops(loss_module, batches[0])
            eng = ds_engine.build_engine(loss_module, trainable, params.train, stage, world_size=world,
                                         precision=precision)
            eng.train()
            times = _time_steps(eng, [to_device(b, eng.device, dtype) for b in batches], warmup)
            step_s = statistics.median(times)
            results["bridge_on" if bridge else "bridge_off"] = {
                "step_s_median": round(step_s, 5),
                "step_s_min": round(min(times), 5),
                "samples_per_s": round(params.train.micro_batch / step_s, 2),
                "flops_per_step": flops,
                "achieved_flops_per_s": round(flops / step_s),
                "mfu": round(flops / step_s / peak, 4),
            }
            eng.destroy()
            del eng
        llm = model.config.llm
    off, on = results["bridge_off"], results["bridge_on"]
    report = {
        "benchmark": "train-throughput",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "precision": precision,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "release": str(release) if release else f"fresh {params.model.preset} preset",
        "architecture": {"hidden_size": llm.hidden_size, "num_layers": llm.num_hidden_layers,
                         "num_heads": llm.num_attention_heads, "num_kv_heads": llm.num_key_value_heads,
                         "total_params": sum(p.numel() for p in model.parameters())},
        "model": params.model.model_dump(mode="json"),
        "micro_batch": params.train.micro_batch,
        "zero_stage": params.train.zero_stage,
        "measured_steps": steps,
        "matmul_peak_flops_per_s": round(peak),
        **results,
        "bridge_step_overhead": round(on["step_s_median"] / off["step_s_median"] - 1, 4),
    }
    Path(out).write_text(json.dumps(report, indent=1))
    return report
