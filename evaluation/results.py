"""The Scone results layout both benchmarks are scored in (SconeEval, evaluation.sconeeval; OmniContext,
evaluation.omnicontext), and the per-case composition score they share.

    <results_dir>/<model>/score_try{g}/<task_type>/score.jsonl

One `score_try{g}` folder holds one *group*: one sampling round scored once (evaluation.sconeeval says how our
runner numbers them). A line may instead hold its repeated scorings as a list under `scorings` (each entry with
PF_score, SC_score, DIS_*): such a folder then counts as len(scorings) groups. Folder and task-type names of the
released Scone tool (`distinction_single_cross`, ...) are read as ours.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from data.formats.jsonl import iter_jsonl

# The released Scone evaluation script names the distinction folders differently.
TASK_TYPE_ALIASES = {
    "distinction_single_cross": "distinction_cross",
    "distinction_single_intra": "distinction_intra",
    "distinction_multi_cross": "distinction_composition_cross",
    "distinction_multi_intra": "distinction_composition_intra",
}
SCORE_FILE = "score.jsonl"


class ResultsLayoutError(ValueError):
    """A results tree that cannot be aggregated; the message names the path and the fix."""


def canonical_task_type(name: str) -> str:
    return TASK_TYPE_ALIASES.get(name, name)


def com_score(pf: float, sc: float) -> float:
    """Composition score of one case: geometric mean of PF and SC (both 0-10)."""
    if pf < 0 or sc < 0:
        raise ValueError(f"PF and SC must be >= 0, got PF={pf}, SC={sc}")
    return math.sqrt(pf * sc)


def write_scores(results_dir: str | Path, model: str, group: int, lines: Iterable[dict]) -> list[Path]:
    """Write one group's score lines to `<results_dir>/<model>/score_try{group}/<task_type>/score.jsonl`
    (group is 1-based). Returns the files written."""
    if group < 1:
        raise ValueError(f"group numbers start at 1 (score_try1), got {group}")
    by_task: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_task[line["task_type"]].append(line)
    paths = []
    for task_type, rows in by_task.items():
        path = Path(results_dir) / model / f"score_try{group}" / task_type / SCORE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths.append(path)
    return paths


def _try_number(path: Path) -> int:
    m = re.fullmatch(r"score_try(\d+)", path.name)
    return int(m.group(1)) if m else -1


def _read_lines(path: Path) -> list[dict]:
    try:
        return [line for _, line in iter_jsonl(path)]
    except ValueError as e:  # names path:line
        raise ResultsLayoutError(str(e)) from None


def read_groups(results_dir: str | Path, model: str) -> list[dict[str, list[dict]]]:
    """Every group of a results tree as {task_type: [score lines]}, in score_try order.

    Lines with a `scorings` list expand their folder into one group per scoring (the entries'
    fields override the line's)."""
    root = Path(results_dir) / model
    tries = sorted((p for p in root.glob("score_try*") if p.is_dir() and _try_number(p) >= 0), key=_try_number)
    if not tries:
        raise ResultsLayoutError(
            f"{root}: no score_try*/<task_type>/score.jsonl folders; run the evaluation first "
            f"(or check --results-dir and --model)"
        )
    groups: list[dict[str, list[dict]]] = []
    for try_dir in tries:
        lines_by_task: dict[str, list[dict]] = defaultdict(list)
        for f in sorted(try_dir.glob("*/*.jsonl")):
            lines_by_task[canonical_task_type(f.parent.name)].extend(_read_lines(f))
        if not lines_by_task:
            raise ResultsLayoutError(f"{try_dir}: holds no <task_type>/score.jsonl file")
        counts = {len(l["scorings"]) for rows in lines_by_task.values() for l in rows if "scorings" in l}
        if len(counts) > 1:
            raise ResultsLayoutError(f"{try_dir}: lines hold different numbers of scorings {sorted(counts)}")
        n_scorings = counts.pop() if counts else 0
        if not n_scorings:
            groups.append(dict(lines_by_task))
            continue
        for s in range(n_scorings):
            groups.append(
                {t: [{**l, **l["scorings"][s]} if "scorings" in l else l for l in rows] for t, rows in lines_by_task.items()}
            )
    return groups
