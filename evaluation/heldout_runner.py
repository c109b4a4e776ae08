"""MICo-Bench and MIGE-Bench of one checkpoint: one sampling round over both, the oracle's figures, each
benchmark's own results layout.

Every case of both benchmarks goes to generate_fn in one call (one round, seed `eval.seed`): a MICo case gives its
source images and prompt, a MIGE case its inputs in placeholder order (the source image among them) and its
multimodal instruction, and asks for the composed / edited image. The oracle (evaluation.oracle_scores) judges
each output against the case's scene graphs. Written under `out_dir`:

    mico/images/<category>/<key>.png, mico/scores.jsonl, mico/summary.json, mico/table.md     (evaluation.mico)
    mige/add/<idx>.png, mige/replace/<idx>.png, mige/scores.jsonl, mige/summary.json,
    mige/table.md                                                                            (evaluation.migebench)

Both benchmarks are held-out worlds the data stage builds (data.heldout); they are small (8 + 8 cases by default)
because every checkpoint of the chain is scored on them.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from evaluation.config import EvalConfig
from evaluation.runner import GenerateFn, generate_images
from evaluation.sconeeval import summary_json


def _fresh(folder: Path) -> Path:
    if folder.exists():  # a former run's images and scores must not mix with this one's
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _save(image: np.ndarray, folder: Path, rel: str) -> str:
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / rel)
    return rel


def score_mico(oracle, cases: Sequence, images: Sequence[np.ndarray], out: Path, model_name: str) -> dict:
    from evaluation.mico import canonical_category, format_mico_table, score_row, summarize, write_results

    rows = []
    for case, image in zip(cases, images):
        category = case.meta.get("category") or case.meta.get("mico_group")
        rel = _save(image, out, f"images/{canonical_category(category)}/{case.key}.png")
        judged = oracle.mico(case, image)
        rows.append(score_row({"key": case.key, "category": category, "sub_task": case.task_type,
                               "composition_type": case.case_type, **judged, "output_image_path": rel}))
    write_results(out, rows)
    summary = summarize(rows)
    summary["model"] = model_name
    (out / "table.md").write_text(format_mico_table([(model_name, summary)]) + "\n")
    return summary


def score_mige(oracle, cases: Sequence, images: Sequence[np.ndarray], out: Path, model_name: str) -> dict:
    from evaluation.migebench import FOLDERS, format_mige_table, summarize, write_results

    rows = []
    for case, image in zip(cases, images):
        edit = case.meta["edit_type"]
        rel = _save(image, out, f"{FOLDERS[edit]}/{case.meta['idx']}.png")
        rows.append({"key": case.key, "edit_type": edit, "idx": case.meta["idx"], **oracle.mige(case, image),
                     "output_image_path": rel})
    summary = summarize(rows)
    for row in rows:  # the per-case score beside its figures, as summarize computed it
        row["score"] = float(np.mean([row[k] for k in ("subject_fidelity", "instruction_following", "preservation")]))
    write_results(out, rows)
    summary["model"] = model_name
    (out / "table.md").write_text(format_mige_table([(model_name, summary)]) + "\n")
    return summary


def evaluate_heldout(generate_fn: GenerateFn, mico_cases: Sequence, mige_cases: Sequence, out_dir: str | Path,
                     eval_cfg: EvalConfig, model_name: str, oracle=None) -> dict[str, dict]:
    """Generate every case of both benchmarks in one call, judge, write both layouts; returns {"mico": summary,
    "mige": summary} (each also in its folder's summary.json)."""
    from evaluation.oracle_scores import SceneOracle

    if not mico_cases or not mige_cases:
        raise ValueError("no MICo-Bench or MIGE-Bench cases to evaluate (are the benchmark folders empty?)")
    out_dir = Path(out_dir)
    oracle = oracle if oracle is not None else SceneOracle(eval_cfg)
    seed = eval_cfg.seed
    t0 = time.perf_counter()
    images = generate_images(generate_fn, [*mico_cases, *mige_cases], seed)
    generate_s = time.perf_counter() - t0
    summaries = {}
    for name, cases, imgs, score in (("mico", mico_cases, images[:len(mico_cases)], score_mico),
                                     ("mige", mige_cases, images[len(mico_cases):], score_mige)):
        t0 = time.perf_counter()
        folder = _fresh(out_dir / name)
        summary = score(oracle, cases, imgs, folder, model_name)
        summary.update(judge=oracle.name, rounds=1, seed=seed, n_cases=len(cases),
                       timings={"generate_s": round(generate_s, 3), "judge_s": round(time.perf_counter() - t0, 3)})
        (folder / "summary.json").write_text(summary_json(summary))
        summaries[name] = summary
    return summaries


def evaluate_heldout_dirs(pipeline, mico_dir: str | Path, mige_dir: str | Path, out_dir: str | Path,
                          eval_cfg: EvalConfig, model_name: str, bridge: bool = False) -> dict[str, dict]:
    """evaluate_heldout for a loaded checkpoint (model.pipeline.load_pipeline) on the benchmark folders the data
    stage builds, sampling with eval.sampling."""
    from data.formats.mico_bench import read_mico_bench
    from data.formats.mige_bench import read_mige_bench
    from evaluation.runner import generate_fn_from_checkpoint

    generate_fn = generate_fn_from_checkpoint(None, eval_cfg.sampling, bridge, pipeline=pipeline)
    return evaluate_heldout(generate_fn, read_mico_bench(mico_dir), read_mige_bench(mige_dir), out_dir, eval_cfg,
                            model_name)
