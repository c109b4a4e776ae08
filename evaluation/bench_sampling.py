"""`scone bench sampling`: per-case sampling latency as the references grow from 1 to 4, with and without the
context cache.

With the cache (model.sampler, use_cache=True) the context (instruction + references) runs through the model
once per batch and every denoising step computes only the target tokens, attending to the cached keys and
values; without it every step recomputes the whole packed sequence. More references lengthen the context
(each adds ViT + latent tokens), so the cached cost of a step grows only through the target queries'
attention span, while the uncached cost grows with the full sequence. The aim: 4 references cost at most
1.5x one reference with the cache.

Method: the stage2_step2 checkpoint when it exists, else a freshly initialised model of params.model
(latency does not depend on the weights). Cases are rendered subject-world scenes (data.render), 1-4
references per case and one fixed instruction; one batch of `cases` cases is sampled with the params'
steps and guidance scales. Each (mode, reference count) is warmed up once and timed `repeats` times,
interleaved so that machine drift spreads over all settings; the figure is the median per-case latency.
The time spent in encode_context and in the per-step velocity calls is measured inside the same runs by
wrapping those model methods, which says what dominates.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from data.render import render_array
from data.scene import OBJECT_CATEGORIES, Placement, Scene, Subject
from model.batching import Example
from model.modeling import SconeModel, load_checkpoint
from model.sampler import generate, guidance_passes
from model.tokenizer import build_tokenizer

REFERENCE_COUNTS = (1, 2, 3, 4)
AIM_RATIO = 1.5
CONTENDED_BELOW = 0.8  # CPU utilisation under which other jobs evidently shared the cores
INSTRUCTION = "Put the subjects from the images together on the beach."
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
_BACKGROUNDS = ("beach", "forest", "city", "snow")


def reference_images(n_refs: int, case: int, size: int) -> list[np.ndarray]:
    """n_refs single-subject renders, different per case and reference."""
    out = []
    for j in range(n_refs):
        k = case * len(REFERENCE_COUNTS) + j
        subject = Subject(
            uid=f"bench-{case}-{j}", domain="object", category=OBJECT_CATEGORIES[k % len(OBJECT_CATEGORIES)],
            colour=_COLOURS[k % len(_COLOURS)],
        )
        lo, hi = size // 4, size - size // 4
        scene = Scene(_BACKGROUNDS[k % len(_BACKGROUNDS)], (Placement(subject, (lo, lo, hi, hi)),), size)
        out.append(render_array(scene))
    return out


def bench_examples(n_refs: int, cases: int, size: int) -> list[Example]:
    return [Example(refs=reference_images(n_refs, i, size), instruction=INSTRUCTION) for i in range(cases)]


def load_model(params) -> tuple[SconeModel, object, str]:
    """(model, tokenizer, where it came from): the stage2_step2 checkpoint if there, else fresh weights."""
    ckpt = Path(params.pipeline.artifacts) / "checkpoints" / "stage2_step2"
    if (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file():
        model, tokenizer = load_checkpoint(ckpt)
        return model, tokenizer, str(ckpt)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return SconeModel.from_model_config(params.model, len(tokenizer)).eval(), tokenizer, "fresh init (params.model)"


class PhaseTimer:
    """Wall time spent inside chosen methods of one model instance (wrapped as instance attributes)."""

    METHODS = ("encode_context", "velocity_from_context", "predict_velocity_dense")

    def __init__(self, model: torch.nn.Module, sync):
        self.model, self.sync = model, sync
        self.seconds = {m: 0.0 for m in self.METHODS}
        self.calls = {m: 0 for m in self.METHODS}

    def __enter__(self):
        for name in self.METHODS:
            original = getattr(self.model, name)

            def timed(*args, _name=name, _original=original, **kwargs):
                self.sync()
                t0 = time.perf_counter()
                out = _original(*args, **kwargs)
                self.sync()
                self.seconds[_name] += time.perf_counter() - t0
                self.calls[_name] += 1
                return out

            setattr(self.model, name, timed)
        return self

    def __exit__(self, *exc):
        for name in self.METHODS:
            delattr(self.model, name)  # the class methods show through again

    def reset(self):
        self.seconds = {m: 0.0 for m in self.METHODS}
        self.calls = {m: 0 for m in self.METHODS}


def context_tokens(model: SconeModel, tokenizer, n_refs: int) -> int:
    """Context length of a case (instruction incl. [BOS] + ViT and latent tokens of every reference)."""
    words = len(tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"]) + 1
    return min(words, model.config.max_text_len) + n_refs * (model.vit_grid**2 + model.latent_grid**2)


def run(params, out: Path, *, cases: int = 8, repeats: int = 5, threads: int | None = None,
        reference_counts: tuple[int, ...] = REFERENCE_COUNTS) -> dict:
    sampling = params.eval.sampling
    threads = threads or min(2, os.cpu_count() or 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, tokenizer, source = load_model(params)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        bridge = bool(params.train.stages["stage2_step2"].bridge) if "stage2_step2" in params.train.stages else False
        examples = {n: bench_examples(n, cases, model.config.image_size) for n in reference_counts}
        kwargs = dict(steps=sampling.steps, cfg_text=sampling.cfg_text, cfg_image=sampling.cfg_image, seed=0,
                      bridge=bridge, batch_size=cases)
        modes = {"cached": True, "uncached": False}
        samples: dict[tuple[str, int], list[dict]] = {(m, n): [] for m in modes for n in reference_counts}
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with PhaseTimer(model, sync) as timer:
            for m, use_cache in modes.items():  # warm-up (allocator, kernels, thread pool): one step is enough
                for n in reference_counts:
                    generate(model, tokenizer, examples[n], use_cache=use_cache, **{**kwargs, "steps": 1})
            for _ in range(repeats):
                for m, use_cache in modes.items():
                    for n in reference_counts:
                        timer.reset()
                        sync()
                        t0, c0 = time.perf_counter(), time.process_time()
                        generate(model, tokenizer, examples[n], use_cache=use_cache, **kwargs)
                        sync()
                        samples[(m, n)].append({"total": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                                                **dict(timer.seconds)})
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        tokens = {str(n): context_tokens(model, tokenizer, n) for n in reference_counts}
        report = _report(samples, modes, reference_counts, cases, tokens)
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "benchmark": "sampling",
        "model_source": source,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "model": {k: model.config.to_model_config().model_dump()[k] for k in ("hidden_size", "num_layers", "num_heads", "image_size")},
        "cases_per_batch": cases,
        "steps": sampling.steps,
        "cfg_text": sampling.cfg_text,
        "cfg_image": sampling.cfg_image,
        "guidance_passes": len(guidance_passes(sampling.cfg_text, sampling.cfg_image)),
        "bridge": bridge,
        "repeats": repeats,
        "bench_wall_s": round(wall, 1),
        # process CPU time / (wall x threads): near 1 on an idle machine, well below when other jobs share the cores
        "cpu_utilisation": round(cpu / (wall * threads), 3),
        "aim": f"cached 4-ref / 1-ref per-case latency <= {AIM_RATIO}",
        **report,
    }
    if report["cpu_utilisation"] < CONTENDED_BELOW:
        report["warning"] = (
            f"other processes shared the cores (CPU utilisation {report['cpu_utilisation']:.2f} of {threads} threads): "
            "wall-clock medians are inflated and noisy; compare the *_min and *_cpu figures, or rerun on an idle machine"
        )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))
    return report


def _report(samples, modes, reference_counts, cases, tokens: dict[str, int]) -> dict:
    per_mode = {}
    for m in modes:
        rows = {}
        for n in reference_counts:
            runs = samples[(m, n)]
            total = statistics.median(r["total"] for r in runs)
            phase = {k: statistics.median(r[k] for r in runs) for k in PhaseTimer.METHODS}
            step_fn = "velocity_from_context" if m == "cached" else "predict_velocity_dense"
            rows[str(n)] = {
                "context_tokens": tokens[str(n)],
                "per_case_ms": round(1000 * total / cases, 3),
                "per_case_ms_min": round(1000 * min(r["total"] for r in runs) / cases, 3),
                # process CPU time (all threads): barely moved by other jobs on the machine, unlike wall time
                "per_case_cpu_ms": round(1000 * statistics.median(r["cpu"] for r in runs) / cases, 3),
                "batch_s": round(total, 5),
                "share_encode_context": round(phase["encode_context"] / total, 3),
                "share_steps": round(phase[step_fn] / total, 3),
                "share_other": round(max(0.0, 1 - (phase["encode_context"] + phase[step_fn]) / total), 3),
            }
        per_mode[m] = rows
    lo, hi = str(min(reference_counts)), str(max(reference_counts))

    def ratios(field):
        return {m: round(per_mode[m][hi][field] / per_mode[m][lo][field], 3) for m in modes}

    def speedups(field):
        return {n: round(per_mode["uncached"][n][field] / per_mode["cached"][n][field], 3) for n in per_mode["cached"]}

    ratio = ratios("per_case_ms")
    cached_hi = per_mode["cached"][hi]
    dominant = max(("encode_context", "steps", "other"), key=lambda k: cached_hi[f"share_{k}"])
    return {
        "per_mode": per_mode,
        f"ratio_{hi}ref_to_{lo}ref": ratio,
        f"ratio_{hi}ref_to_{lo}ref_min": ratios("per_case_ms_min"),
        f"ratio_{hi}ref_to_{lo}ref_cpu": ratios("per_case_cpu_ms"),
        "cache_speedup": speedups("per_case_ms"),
        "cache_speedup_cpu": speedups("per_case_cpu_ms"),
        "aim_met": ratio["cached"] <= AIM_RATIO,
        "cached_dominant_phase_at_max_refs": dominant,
    }
