"""Evaluate a checkpoint on a SconeEval-layout benchmark: generate -> judge -> results layout -> summary.

Protocol (Scone Sec. 5.1): `eval.rounds` sampling rounds with seeds `eval.seed + r`, each scored
`eval.scorings` times. A round's cases go to generate_fn in one call (model.bagel.generate derives each
case's noise from the seed and its position, so images do not depend on the batch size). Outputs under `<out_dir>/<model_name>/`:

    images_try{r+1}/<task_type>/<key>.png           generated images of round r
    score_try{g}/<task_type>/score.jsonl            g = r * scorings + s + 1 (see evaluation.sconeeval)
    summary.json                                    aggregate (mean/std over the groups) + sample images
    table3.md                                       the Table 3 row of this model

A deterministic judge (the oracle) is asked once per round; its answers are written for every scoring,
so the layout keeps the protocol's 9 groups without 9x the work.
"""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from evaluation.config import EvalConfig, SamplingConfig
from evaluation.results import write_scores
from evaluation.sconeeval import aggregate, format_table3, is_distinction, score_line, summary_json

GenerateFn = Callable[[list, int], list[np.ndarray]]


def reference_images(case) -> list[np.ndarray]:
    """The case's input images: the benchmark's files when it was read from disk
    (`meta['input_images']`, as data.formats.sconeeval.read_bench records them), else renders of
    its reference scenes."""
    paths = (getattr(case, "meta", None) or {}).get("input_images")
    if paths:
        return [np.array(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths]
    if any(ref is None for ref in case.references):
        raise ValueError(f"case {case.key}: neither input image files (meta['input_images']) nor reference scenes")
    from data.render import render_array

    return [render_array(ref) for ref in case.references]


def make_examples(cases: Sequence) -> list:
    """model.batching.Example per case: the references and the instruction (no target)."""
    from model.batching import Example

    return [Example(refs=reference_images(c), instruction=c.instruction, target=None, qa=[]) for c in cases]


def generate_images(generate_fn: GenerateFn, cases: Sequence, seed: int) -> list[np.ndarray]:
    """One image per case. All cases of a round go to generate_fn in one call: model.bagel.generate draws each
    case's noise from (seed, position), so splitting a round into calls would repeat noise; the
    checkpoint generate_fn batches by eval.sampling.batch_size itself."""
    images = generate_fn(make_examples(cases), seed)
    if len(images) != len(cases):
        raise RuntimeError(f"generate_fn returned {len(images)} images for {len(cases)} examples")
    return [np.asarray(im, dtype=np.uint8) for im in images]


def judge_case(judge, case, image: np.ndarray, extra: dict | None = None) -> dict:
    """One score line: PF, SC and, on distinction types, a presence answer per candidate; `extra`
    fields (round, scoring, ...) are added to the line."""
    pf, sc, reason = judge.composition(case, image)
    presence = reasons = None
    if is_distinction(case.task_type):
        presence, reasons = [], []
        for i, phrases in enumerate(case.subject_list):
            answers = [judge.presence(case, i, phrase, image) for phrase in phrases]
            presence.append([int(a) for a, _ in answers])
            reasons.append([r for _, r in answers])
    return score_line(case, pf, sc, reason, presence, reasons, **(extra or {}))


def _clear_previous(model_dir: Path) -> None:
    # a former run with more rounds would otherwise leave groups that aggregate() picks up
    for stale in [*model_dir.glob("score_try*"), *model_dir.glob("images_try*")]:
        if stale.is_dir():
            shutil.rmtree(stale)


def evaluate_checkpoint(
    generate_fn: GenerateFn,
    cases: Sequence,
    out_dir: str | Path,
    model_name: str,
    eval_cfg: EvalConfig,
    judge,
    sample_images: int = 6,
) -> dict:
    """Run the SconeEval protocol with `generate_fn(examples, seed) -> list[uint8 HxWx3]` and `judge`.

    Returns the summary (evaluation.sconeeval.aggregate plus protocol facts), also written to
    `<out_dir>/<model_name>/summary.json`."""
    if not cases:
        raise ValueError("no benchmark cases to evaluate (is the benchmark folder empty?)")
    model_dir = Path(out_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(model_dir)
    rounds, scorings = eval_cfg.rounds, eval_cfg.scorings
    workers = max(1, int(getattr(judge, "concurrency", 1)))
    timings = {"generate_s": 0.0, "judge_s": 0.0}
    # which judge, and for the openai judge which protocol (eval.openai.protocol), produced the scores
    protocol = getattr(judge, "protocol", None)
    tag = {"judge": judge.name, **({"judge_protocol": protocol} if protocol else {})}
    samples: list[str] = []
    for r in tqdm(range(rounds), desc=f"SconeEval {model_name}", unit="round"):
        seed = eval_cfg.seed + r
        t0 = time.perf_counter()
        images = generate_images(generate_fn, list(cases), seed)
        timings["generate_s"] += time.perf_counter() - t0
        paths = []
        for case, image in zip(cases, images):
            rel = Path(f"images_try{r + 1}") / case.task_type / f"{case.key}.png"
            (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(model_dir / rel)
            paths.append(rel.as_posix())
        if r == 0:
            samples = _pick_samples(cases, paths, sample_images)
        t0 = time.perf_counter()
        first: list[dict] | None = None
        for s in range(scorings):
            extra = lambda i: {"round": r + 1, "scoring": s + 1, "seed": seed, "output_image_path": paths[i], **tag}
            if first is not None and judge.deterministic:
                lines = [{**line, "scoring": s + 1} for line in first]
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    lines = list(
                        tqdm(
                            pool.map(lambda i: judge_case(judge, cases[i], images[i], extra(i)), range(len(cases))),
                            total=len(cases),
                            desc=f"judge round {r + 1} scoring {s + 1}",
                            unit="case",
                            leave=False,
                        )
                    )
            first = first or lines
            write_scores(Path(out_dir), model_name, r * scorings + s + 1, lines)
        timings["judge_s"] += time.perf_counter() - t0
    summary = aggregate(out_dir, model_name)
    summary.update(
        **tag,
        rounds=rounds,
        scorings=scorings,
        seeds=[eval_cfg.seed + r for r in range(rounds)],
        n_cases=len(cases),
        sample_images=samples,
        timings={k: round(v, 3) for k, v in timings.items()},
    )
    if hasattr(judge, "usage"):  # tokens and cost of an API judge, per checkpoint
        summary["judge_usage"] = judge.usage()
        judge.write_usage(model_dir / "judge_usage.json")
    (model_dir / "summary.json").write_text(summary_json(summary))
    (model_dir / "table3.md").write_text(format_table3(summary, with_std=True) + "\n")
    return summary


def _pick_samples(cases, paths, n) -> list[str]:
    """A few image paths (relative to the model folder), one per task type first."""
    picked, seen = [], set()
    for case, p in zip(cases, paths):
        if case.task_type not in seen:
            seen.add(case.task_type)
            picked.append(p)
    picked += [p for p in paths if p not in picked]
    return picked[:n]


def generate_fn_from_checkpoint(ckpt_dir: str | Path, sampling_cfg: SamplingConfig, bridge: bool,
                                pipeline_settings: dict | None = None, pipeline=None) -> GenerateFn:
    """generate_fn for a checkpoint folder (model.pipeline.load_pipeline), sampling in batches of
    `sampling_cfg.batch_size`."""
    import torch

    from model.pipeline import load_pipeline

    pipe = pipeline if pipeline is not None else load_pipeline(ckpt_dir, pipeline_settings)

    def generate_fn(examples: list, seed: int) -> list[np.ndarray]:
        with torch.no_grad():
            return pipe.generate(examples, steps=sampling_cfg.steps, cfg_text=sampling_cfg.cfg_text,
                                 cfg_image=sampling_cfg.cfg_image, seed=seed, bridge=bridge,
                                 batch_size=sampling_cfg.batch_size)

    return generate_fn


def evaluate_checkpoint_dir(
    ckpt_dir: str | Path,
    bench_dir: str | Path,
    out_dir: str | Path,
    eval_cfg: EvalConfig,
    model_name: str | None = None,
    bridge: bool = False,
    judge=None,
    pipeline=None,
    pipeline_settings: dict | None = None,
) -> dict:
    """The whole evaluation of a checkpoint folder on a benchmark folder, as the flows call it. `pipeline`: the
    checkpoint already loaded (model.pipeline.load_pipeline), else it is loaded with `pipeline_settings`."""
    from data.formats.sconeeval import read_bench
    from evaluation.judges import make_judge
    from model.pipeline import load_pipeline

    cases = read_bench(bench_dir)
    pipe = pipeline if pipeline is not None else load_pipeline(ckpt_dir, pipeline_settings)
    own = judge is None
    if own:  # the self judge is the checkpoint's own understanding expert
        extra = {"pipeline": pipe} if eval_cfg.judge == "self" else {}
        judge = make_judge(eval_cfg.judge, eval_cfg, **extra)
    generate_fn = generate_fn_from_checkpoint(ckpt_dir, eval_cfg.sampling, bridge, pipeline=pipe)
    try:
        return evaluate_checkpoint(generate_fn, cases, out_dir, model_name or Path(ckpt_dir).name, eval_cfg, judge)
    finally:
        if own and hasattr(judge, "close"):
            judge.close()
