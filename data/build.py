"""Build the datasets of the subject world under `cfg.root`; each is a pure function of the config.

- scone_single_candidate_base: single-candidate composition rows; `cfg.defect_fraction` of the targets are
  spoilt (wrong colour / missing subject / wrong position) like a noisy generated pool, recorded in meta.
- scone_single_candidate_refined: the base rows the consistency judge scores >= quality.refined_keep_score.
- scone_multi_candidate: single-candidate rows whose references get cross- or intra-category candidates
  added (target unchanged), over the four distinction task types.
- sconeeval_bench: bench_per_task held-out cases per SconeEval task type, SconeEval layout.
- srum_prompts: compositional text-to-image prompts with their target scene graphs.

Rows failing the structural checks of data.quality are quarantined (listed in <root>/quarantine/<name>.jsonl);
more than quality.max_quarantine_fraction of them fails the build.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from data.config import DataConfig
from data.formats import scone_s2i, sconeeval, srum_prompts
from data.instructions import get_writer
from data.quality import check_case, get_judge
from data.records import TASK_TYPES, Case
from data.world import DEFECTS, World

BASE = "scone_single_candidate_base"
REFINED = "scone_single_candidate_refined"
MULTI = "scone_multi_candidate"
BENCH = "sconeeval_bench"
SRUM = "srum_prompts"
S2I_DATASETS = (BASE, REFINED, MULTI)
DATASETS = (*S2I_DATASETS, BENCH, SRUM)
MULTI_SUBJECT_SHARE = 0.6  # base rows with 2+ references (the rest: one subject)
DISTINCTION_TASKS = TASK_TYPES[2:]


class DataQualityError(RuntimeError):
    """Too many generated rows failed the structural checks."""


def _world(cfg: DataConfig, stream: str, split: str) -> World:
    return World(cfg.seed, stream, split=split, image_size=cfg.image_size, writer=get_writer(cfg.instruction_writer))


def _progress(n: int, name: str):
    return tqdm(total=n, desc=f"build {name}", unit="row", disable=None, leave=False)


def base_cases(cfg: DataConfig) -> list[Case]:
    """The base pool, defects included (deterministic: the refined subset is derived from the same rows)."""
    world = _world(cfg, BASE, "train")
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
    world = _world(cfg, MULTI, "train")
    n = cfg.sizes.multi_candidate
    cases = []
    with _progress(n, MULTI) as bar:
        for i in range(n):
            cases.append(world.case(f"multi_{i:06d}", world.pick(tasks), cfg.max_references))
            bar.update()
    return cases


def bench_cases(cfg: DataConfig) -> list[Case]:
    world = _world(cfg, BENCH, "heldout")
    return [
        world.case(f"{task}_{i:04d}", task, cfg.max_references)
        for task in TASK_TYPES
        for i in range(cfg.sizes.bench_per_task)
    ]


def _quarantine(cases: list[Case], cfg: DataConfig, name: str) -> tuple[list[Case], int]:
    good, bad = [], []
    for case in cases:
        problems = check_case(case)
        (bad if problems else good).append(case if not problems else {"key": case.key, "problems": problems})
    qdir = Path(cfg.root) / "quarantine"
    qfile = qdir / f"{name}.jsonl"
    if bad:
        qdir.mkdir(parents=True, exist_ok=True)
        qfile.write_text("".join(json.dumps(b, sort_keys=True) + "\n" for b in bad))
    elif qfile.exists():
        qfile.unlink()
    fraction = len(bad) / max(len(cases), 1)
    if fraction > cfg.quality.max_quarantine_fraction:
        examples = "\n".join(f"  {b['key']}: {'; '.join(b['problems'])}" for b in bad[:5])
        raise DataQualityError(
            f"dataset {name}: {len(bad)} of {len(cases)} rows quarantined ({fraction:.1%} > "
            f"data.quality.max_quarantine_fraction={cfg.quality.max_quarantine_fraction}); see {qfile}\n{examples}"
        )
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
    root = Path(cfg.root)
    rows_per_file = cfg.rows_per_row_group * cfg.row_groups_per_file
    if name in S2I_DATASETS:
        if name == MULTI:
            cases = multi_candidate_cases(cfg)
        else:
            cases = base_cases(cfg)
        cases, quarantined = _quarantine(cases, cfg, name)
        extra: dict = {}
        if name == BASE:
            extra["defects"] = dict(sorted(Counter(c.meta.get("defect") or "none" for c in cases).items()))
        if name == REFINED:
            extra["source_rows"] = len(cases)
            cases = refined_cases(cfg, cases)
        files = scone_s2i.write_dataset(cases, root, name, cfg.rows_per_row_group, rows_per_file)
        return _summary(name, cases, quarantined, started, files=[str(f) for f in files], **extra)
    if name == BENCH:
        cases, quarantined = _quarantine(bench_cases(cfg), cfg, name)
        path = sconeeval.write_bench(cases, root / BENCH)
        return _summary(name, cases, quarantined, started, files=[str(path)])
    if name == SRUM:
        rows = srum_prompts.make_prompts(_world(cfg, SRUM, "train"), cfg.sizes.srum_prompts)
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
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def build_all(cfg: DataConfig) -> dict[str, dict]:
    return {name: build_dataset(name, cfg) for name in DATASETS}
