"""Build the datasets of the subject world under `cfg.root`; each is a pure function of the config.

- scone_single_candidate_base: single-candidate composition rows; `cfg.defect_fraction` of the targets are
  spoilt (wrong colour / missing subject / wrong position) like a noisy generated pool, recorded in meta.
- scone_single_candidate_refined: the base rows the consistency judge scores >= quality.refined_keep_score.
- scone_multi_candidate: single-candidate rows whose references get cross- or intra-category candidates
  added (target unchanged), over the four distinction task types.
- sconeeval_bench: bench_per_task held-out cases per SconeEval task type, SconeEval layout.
- srum_prompts: compositional text-to-image prompts with their target scene graphs.
- t2i_pretrain: text-to-image rows (no references) of the same prompt world, another stream (data.t2i): the
  T2I competence a unified base model brings, mixed into Stage I.
- und_pretrain: understanding rows (one image, questions about presence, colour, shape, texture, count, position
  and scene with one-word and yes / no answers, short captions; data.understanding): the understanding a unified
  base model brings, taught in the first stage (und_pretrain).
- und_heldout: the held-out understanding questions (held-out subject combinations, other images) every
  checkpoint is scored on (evaluation.understanding).

- mico: MICo-150K's 27 composition types and De&Re over the subject world (data.mico), Scone-S2I layout.
- mige_edit: MIGE's instruction-based subject addition / replacement with <imagehere> instructions (data.mige).
- mico_bench, mige_bench: held-out MICo-Bench / MIGE-Bench cases (data.heldout) in those benchmarks' own layouts
  (data.formats.mico_bench, data.formats.mige_bench), scored per checkpoint beside SconeEval.

Rows failing the structural checks of data.quality or the row checks of data.quarantine go to
<root>/quarantine/<name>.parquet (row + `reason`); more than quality.max_quarantine_fraction of them fails
the build. Rows are rendered by `data.num_workers` processes; the output is the same for any count.
With `instruction_writer: openai` the cases are drawn exactly as with templates and their instructions
are then rewritten by the LLM from the referring phrases alone (data.llm_writer).
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from data.catalog import (ALL_DATASETS, BASE, BENCH, DATASETS, HELDOUT_BENCHES, MICO, MICO_BENCH, MIGE, MULTI, REFINED,
                          S2I_DATASETS, SRUM, T2I, UND, UND_HELDOUT, min_images_of)
from data.config import DataConfig
from data.formats import scone_s2i, sconeeval, srum_prompts
from data.mico import mico_cases, skipped_types
from data.mige import mige_cases
from data.parallel import render_rows
from data.quality import check_case, get_judge
from data.quarantine import DataQualityError, RowFilter, enforce_threshold, row_key, write_quarantine
from data.records import TASK_TYPES, Case
from data.t2i import t2i_cases
from data.world import DEFECTS, dataset_world

MULTI_SUBJECT_SHARE = 0.6  # base rows with 2+ references (the rest: one subject)
DISTINCTION_TASKS = TASK_TYPES[2:]

__all__ = ["DataQualityError", "build_dataset", "build_all", "ALL_DATASETS", "DATASETS"]


def _rewrite_instructions(cases: list[Case], cfg: DataConfig) -> list[Case]:
    if cfg.instruction_writer == "template":
        return cases
    from data.llm_writer import rewrite_cases

    return rewrite_cases(cases, cfg)


tqdm.monitor_interval = 0  # no monitor thread: row rendering forks workers only from a single-threaded process


def _progress(n: int, name: str):
    return tqdm(total=n, desc=f"build {name}", unit="row", disable=None, leave=False)


def base_cases(cfg: DataConfig) -> list[Case]:
    """The base pool, defects included (deterministic: the refined subset is derived from the same rows)."""
    world = dataset_world(cfg, BASE, "train")
    n = cfg.sizes.base
    spoilt = set(world.rng.choice(n, round(cfg.defect_fraction * n), replace=False).tolist())
    cases = []
    with _progress(n, BASE) as bar:
        for i in range(n):
            multi = cfg.max_references >= 2 and world.rng.random() < MULTI_SUBJECT_SHARE
            case = world.case(f"base_{i:06d}", TASK_TYPES[1] if multi else TASK_TYPES[0], cfg.max_references)
            if i in spoilt:
                case = world.inject_defect(case, world.pick(DEFECTS))
            else:
                case.meta = case.meta | {"defect": None}
            cases.append(case)
            bar.update()
    return cases


def refined_cases(cfg: DataConfig, base: list[Case] | None = None, judge=None) -> list[Case]:
    judge = judge or get_judge()
    kept = []
    for case in base if base is not None else base_cases(cfg):
        score, reasons = judge.score(case)
        if score >= cfg.quality.refined_keep_score:
            case.meta = case.meta | {"judge_score": score, "judge_reasons": reasons}
            kept.append(case)
    return kept


def multi_candidate_cases(cfg: DataConfig) -> list[Case]:
    if cfg.max_references < 2:
        tasks = ("distinction_cross", "distinction_intra")
    else:
        tasks = DISTINCTION_TASKS
    world = dataset_world(cfg, MULTI, "train")
    n = cfg.sizes.multi_candidate
    cases = []
    with _progress(n, MULTI) as bar:
        for i in range(n):
            cases.append(world.case(f"multi_{i:06d}", world.pick(tasks), cfg.max_references))
            bar.update()
    return cases


def bench_cases(cfg: DataConfig) -> list[Case]:
    world = dataset_world(cfg, BENCH, "heldout")
    return [
        world.case(f"{task}_{i:04d}", task, cfg.max_references)
        for task in TASK_TYPES
        for i in range(cfg.sizes.bench_per_task)
    ]


def _cases_to_rows(cases: list[Case], cfg: DataConfig, name: str) -> tuple[list[dict], list[tuple[dict, str]]]:
    """Structural checks on the cases, then rendered rows; returns (rows, quarantined (row, reason) pairs)."""
    good, bad = [], []
    for case in cases:
        problems = check_case(case)
        if problems:
            try:
                row = case.to_row()
            except Exception:  # a case too broken to render is quarantined by its text fields alone
                row = {"key": case.key, "instruction": case.instruction, "task_type": case.task_type}
            bad.append((row, "; ".join(problems)))
        else:
            good.append(case)
    return render_rows(good, cfg.num_workers, cfg.rows_per_row_group), bad


def _quarantine(rows: list[dict], bad: list[tuple[dict, str]], cfg: DataConfig, name: str, min_images: int = 2) -> tuple[list[dict], int]:
    """Row checks on rendered rows; quarantine file and threshold over both kinds of problems."""
    keep = RowFilter.for_config(cfg, min_images=min_images)
    good = list(keep(rows))
    bad = bad + keep.bad
    write_quarantine(bad, cfg, name)
    enforce_threshold(len(bad), len(rows) + len(bad) - len(keep.bad), cfg, name, [(row_key(r), why) for r, why in bad])
    return good, len(bad)


def _quarantine_cases(cases: list[Case], cfg: DataConfig, name: str) -> tuple[list[Case], int]:
    """Structural checks only (benchmark cases are written as PNG files, not rows)."""
    good, bad = [], []
    for case in cases:
        problems = check_case(case)
        if problems:
            bad.append(({"key": case.key, "instruction": case.instruction, "task_type": case.task_type}, "; ".join(problems)))
        else:
            good.append(case)
    write_quarantine(bad, cfg, name)
    enforce_threshold(len(bad), len(cases), cfg, name, [(r["key"], why) for r, why in bad])
    return good, len(bad)


def _summary(name: str, cases: list[Case], quarantined: int, started: float, **extra) -> dict:
    return {
        "name": name,
        "rows": len(cases),
        "task_type": dict(sorted(Counter(c.task_type for c in cases).items())),
        "case_type": dict(sorted(Counter(c.case_type for c in cases).items())),
        "quarantined": quarantined,
        **extra,
        "seconds": round(time.perf_counter() - started, 3),
    }


def build_dataset(name: str, cfg: DataConfig) -> dict:
    """Build one dataset under cfg.root and return its summary (counts per task type and case type)."""
    started = time.perf_counter()
    if name == MICO:  # MICo has its own input limit (its five-input types), for the row checks too
        cfg = cfg.model_copy(update={"max_references": cfg.mico_max_references})
    root = Path(cfg.root)
    rows_per_file = cfg.rows_per_row_group * cfg.row_groups_per_file
    if name in S2I_DATASETS:
        extra: dict = {}
        if name == MULTI:
            cases = multi_candidate_cases(cfg)
        elif name == MICO:
            cases = mico_cases(cfg)
            extra["skipped_types"] = skipped_types(cfg)
        elif name == MIGE:
            cases = mige_cases(cfg)
        elif name == T2I:
            cases = t2i_cases(cfg)
        elif name in (UND, UND_HELDOUT):
            from data.understanding import understanding_cases

            cases = understanding_cases(cfg, name)
        else:
            cases = base_cases(cfg)
        if name == BASE:
            extra["defects"] = dict(sorted(Counter(c.meta.get("defect") or "none" for c in cases).items()))
        if name == REFINED:
            extra["source_rows"] = len(cases)
            cases = refined_cases(cfg, [c for c in cases if not check_case(c)])
        cases = _rewrite_instructions(cases, cfg)
        rows, bad = _cases_to_rows(cases, cfg, name)
        rows, quarantined = _quarantine(rows, bad, cfg, name, min_images=min_images_of(name))
        kept = {r["key"] for r in rows}
        cases = [c for c in cases if c.key in kept]
        files = scone_s2i.write_rows(rows, root, name, cfg.rows_per_row_group, rows_per_file)
        return _summary(name, cases, quarantined, started, files=[str(f) for f in files], **extra)
    if name == BENCH:
        cases, quarantined = _quarantine_cases(_rewrite_instructions(bench_cases(cfg), cfg), cfg, name)
        path = sconeeval.write_bench(cases, root / BENCH)
        return _summary(name, cases, quarantined, started, files=[str(path)])
    if name in HELDOUT_BENCHES:  # MICo-Bench / MIGE-Bench cases, each in its benchmark's layout
        from data.formats.mico_bench import write_mico_bench
        from data.formats.mige_bench import write_mige_bench
        from data.heldout import mico_bench_cases, mige_bench_cases

        make, write = ((mico_bench_cases, write_mico_bench) if name == MICO_BENCH
                       else (mige_bench_cases, write_mige_bench))
        cases, quarantined = _quarantine_cases(_rewrite_instructions(make(cfg), cfg), cfg, name)
        path = write(cases, root / name)
        return _summary(name, cases, quarantined, started, files=[str(path)])
    if name == SRUM:
        rows = srum_prompts.make_prompts(dataset_world(cfg, SRUM, "train"), cfg.sizes.srum_prompts)
        path = srum_prompts.write_prompts(rows, root / SRUM / "prompts.jsonl")
        summary = {
            "name": name,
            "rows": len(rows),
            "category": dict(sorted(Counter(r["category"] for r in rows).items())),
            "quarantined": 0,
            "files": [str(path)],
            "seconds": round(time.perf_counter() - started, 3),
        }
        return summary
    raise ValueError(f"unknown dataset {name!r}; expected one of {ALL_DATASETS}")


def build_all(cfg: DataConfig, names: tuple[str, ...] = DATASETS) -> dict[str, dict]:
    return {name: build_dataset(name, cfg) for name in names}
