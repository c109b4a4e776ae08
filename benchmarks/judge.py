"""`scone bench judge`: does the openai judge scale? A SconeEval scoring run against a local stub.

The endpoint is benchmarks/openai_stub.py in its own process on 127.0.0.1, answering every
request after `latency_s` (300 ms: a VLM's answer time) with a deterministic score derived from the
request. The run goes through evaluation.runner.evaluate_checkpoint unchanged (its thread pool,
the judge's event loop and semaphore, the results layout), one round, one scoring:

1. concurrent: `concurrency` requests in flight (64 by default: 300 ms latency needs ~20 x the
   one-at-a-time rate, and a real endpoint's rate limit sets the production value,
   eval.openai.concurrency), cold cache;
2. one request at a time (concurrency 1), cold cache. 400 cases x ~4 requests x 300 ms is ~8
   minutes, so when the estimate exceeds `sequential_budget_s` this leg scores a subset (one copy
   of every benchmark case) and its rate (seconds per request) is extrapolated to the whole run:
   the JSON says `sequential.extrapolated: true` and `sequential.measured_cases`;
3. the concurrent run again with a fresh judge on the first run's cache: it must send 0 requests.

Cases: the built benchmark (artifacts/data/sconeeval_bench) cycled to `n_cases`, each copy with
its own key and its own image (copy 0: the exact render of the ground-truth target; copy k: that
render plus seeded noise of at most +-6 levels), so the cache cannot collapse copies.

Reported: wall and judge seconds per leg, requests the server saw, the largest number in flight
there, the speed-up (sequential judge seconds, extrapolated if so, over concurrent), whether the
scores of the cases both legs scored are identical, and the judge's token/cost accounting.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import httpx
import numpy as np

from data.formats.jsonl import read_jsonl
from evaluation.sconeeval import is_distinction

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params

STUB = Path(__file__).with_name("openai_stub.py")  # run as a script: the child process needs nothing of the project
SCORE_FIELDS = ("PF_score", "SC_score", "DIS_pred")


def requests_per_case(case) -> int:
    """HTTP requests the openai judge sends for one case: PF + SC, and one per candidate on the
    distinction task types."""
    return 2 + (sum(len(p) for p in case.subject_list) if is_distinction(case.task_type) else 0)


def synthesize(cases: list, n: int, noise: int = 6) -> tuple[list, list[np.ndarray]]:
    """`n` cases cycling through `cases`, with distinct keys and images."""
    from data.render import render_array

    if not cases:
        raise ValueError("the benchmark has no cases; build it first (scone data build sconeeval_bench)")
    out_cases, images = [], []
    for k in range(n):
        base = cases[k % len(cases)]
        copy = k // len(cases)
        if base.target is None:
            raise ValueError(f"case {base.key}: no ground-truth target to render (benchmark without ground_truth.jsonl)")
        img = render_array(base.target).astype(np.int16)
        if copy:
            rng = np.random.default_rng(copy * 100_003 + k % len(cases))
            img = img + rng.integers(-noise, noise + 1, size=img.shape)
        out_cases.append(dataclasses.replace(base, key=f"{base.key}_x{copy:02d}"))
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return out_cases, images


@contextmanager
def stub_endpoint(latency_s: float) -> Iterator[str]:
    """The stub server in a child process; yields its base URL (http://127.0.0.1:PORT)."""
    proc = subprocess.Popen([sys.executable, str(STUB), "--latency", str(latency_s)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the stub server did not start (said {line!r}, exit code {proc.poll()})")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stub(root: str, action: str) -> dict:
    if action == "reset":
        return httpx.post(f"{root}/stub/reset", timeout=10).json()
    return httpx.get(f"{root}/stub/stats", timeout=10).json()


def _leg(root: str, cases, images, eval_cfg, openai_cfg, work: Path, name: str) -> dict:
    """Score `cases` once through the runner with a fresh judge; figures and the score lines."""
    from evaluation.judges.openai import OpenAIJudge
    from evaluation.runner import evaluate_checkpoint

    _stub(root, "reset")
    cfg = eval_cfg.model_copy(update={"openai": openai_cfg, "judge": "openai", "rounds": 1, "scorings": 1})

    def generate_fn(examples, seed):  # the "generated" images are the synthesised ones, in case order
        return list(images[: len(examples)])

    with OpenAIJudge(openai_cfg) as judge:
        t0 = time.perf_counter()
        summary = evaluate_checkpoint(generate_fn, cases, work, name, cfg, judge, sample_images=0)
        wall = time.perf_counter() - t0
        usage = judge.usage()
    stats = _stub(root, "stats")
    lines = {}
    for path in sorted((work / name / "score_try1").glob("*/score.jsonl")):
        for line in read_jsonl(path):
            lines[line["key"]] = {k: line.get(k) for k in SCORE_FIELDS}
    return {
        "cases": len(cases),
        "concurrency": openai_cfg.concurrency,
        "wall_s": round(wall, 3),
        "judge_s": summary["timings"]["judge_s"],
        "server_requests": stats["requests"],
        "server_max_in_flight": stats["max_in_flight"],
        "judge_usage": usage,
        "_lines": lines,
    }


def run(
    params: Params,
    out: Path,
    *,
    n_cases: int = 400,
    latency_s: float = 0.3,
    concurrency: int = 64,
    sequential_budget_s: float = 240.0,
    sequential_cases: int | None = None,
) -> dict:
    """Measure and write the JSON to `out`; returns it."""
    from data.formats.sconeeval import read_bench
    from tasks.paths import Paths

    bench_dir = Paths.from_params(params).sconeeval_bench
    base = read_bench(bench_dir)
    cases, images = synthesize(base, n_cases)
    total_requests = sum(requests_per_case(c) for c in cases)
    estimate_s = total_requests * latency_s
    if sequential_cases is None:
        sequential_cases = n_cases if estimate_s <= sequential_budget_s else min(n_cases, len(base))
    seq_cases, seq_images = cases[:sequential_cases], images[:sequential_cases]
    seq_requests = sum(requests_per_case(c) for c in seq_cases)

    with tempfile.TemporaryDirectory(prefix="bench_judge_") as tmp, stub_endpoint(latency_s) as root:
        work = Path(tmp)
        base_cfg = params.eval.openai.model_copy(update={"base_url": f"{root}/v1", "cache": True})
        conc_cfg = base_cfg.model_copy(update={"concurrency": concurrency, "cache_dir": str(work / "cache_concurrent")})
        seq_cfg = base_cfg.model_copy(update={"concurrency": 1, "cache_dir": str(work / "cache_sequential")})

        concurrent = _leg(root, cases, images, params.eval, conc_cfg, work, "concurrent")
        sequential = _leg(root, seq_cases, seq_images, params.eval, seq_cfg, work, "sequential")
        cached = _leg(root, cases, images, params.eval, conc_cfg, work, "cached")

    conc_lines, seq_lines, cached_lines = concurrent.pop("_lines"), sequential.pop("_lines"), cached.pop("_lines")
    per_request = sequential["judge_s"] / max(seq_requests, 1)
    seq_full_s = per_request * total_requests
    extrapolated = sequential_cases < n_cases
    sequential.update(
        measured_cases=sequential_cases,
        measured_requests=seq_requests,
        seconds_per_request=round(per_request, 6),
        extrapolated=extrapolated,
        judge_s_all_cases=round(seq_full_s, 3),
    )
    compared = [k for k in seq_lines]
    result = {
        "benchmark": str(bench_dir),
        "base_cases": len(base),
        "cases": n_cases,
        "judge_calls": {
            "composition": n_cases,
            "presence": sum(requests_per_case(c) - 2 for c in cases),
        },
        "requests_expected": total_requests,
        "latency_s": latency_s,
        "concurrency": concurrency,
        "params_concurrency": params.eval.openai.concurrency,
        "model": params.eval.openai.model,
        "concurrent": concurrent,
        "sequential": sequential,
        "cached_rerun": cached,
        "speedup": round(seq_full_s / concurrent["judge_s"], 2) if concurrent["judge_s"] > 0 else None,
        "speedup_note": (
            "sequential judge seconds extrapolated from measured_requests to all requests at the measured "
            "seconds per request" if extrapolated else "both legs measured on every case"
        ),
        "scores_identical": bool(compared) and all(seq_lines[k] == conc_lines.get(k) for k in compared),
        "scores_compared_cases": len(compared),
        "cache_rerun_requests": cached["server_requests"],
        "cache_rerun_identical": cached_lines == conc_lines,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
