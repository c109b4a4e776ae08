"""OmniContext scoring (the benchmark of Scone paper Table 2 and Table 4) over the Scone results layout.

OmniContext groups its cases by input setting x subject kind, eight categories in all:

    SINGLE   character | object
    MULTIPLE character | object | character + object
    SCENE    character | object | character + object

Per case the judge gives prompt following PF and subject consistency SC on 0-10 (the same VIEScore-style
judgement as SconeEval's composition score); the case's overall score is their geometric mean sqrt(PF * SC).
Per category PF, SC and overall are averaged over its cases; the Average column is the plain mean of the
category figures (Scone Table 2: e.g. Scone's eight categories average to the published 8.01). Averaging
the per-case geometric means, not taking the geometric mean of averaged PF and SC, is what makes Table 4's
overall lower than sqrt(PF * SC) of its own columns (BAGEL: PF 6.74, SC 5.73, overall 6.03 < 6.21).

Results layout: that of evaluation.results (SconeEval's), `<results_dir>/<model>/score_try{k}/<task_type>/score.jsonl`
with PF_score and SC_score per line. Folder names are those of the released evaluation script
(`single_character`, `multi_character_object`, `scene_object`, ...); case and the spellings
`multiple` / `char_obj` / `object_character` / `character+object` are accepted. Every score_try folder is
one group, aggregated as SconeEval's: figures per group, then mean and population std over the groups.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from evaluation.paper_results import SCONE_TABLE2
from evaluation.results import ResultsLayoutError, com_score, read_groups

SETTINGS = ("single", "multi", "scene")
CATEGORIES = (
    "single_character",
    "single_object",
    "multi_character",
    "multi_object",
    "multi_character_object",
    "scene_character",
    "scene_object",
    "scene_character_object",
)
SETTING_TITLES = {"single": "SINGLE", "multi": "MULTIPLE", "scene": "SCENE"}
KIND_TITLES = {"character": "Character", "object": "Object", "character_object": "Char. + Obj."}
FIGURES = ("PF", "SC", "overall")

_SETTING_SPELLINGS = {"single": "single", "multi": "multi", "multiple": "multi", "scene": "scene"}
_KIND_SPELLINGS = {
    "character": "character",
    "char": "character",
    "object": "object",
    "obj": "object",
    "character_object": "character_object",
    "char_obj": "character_object",
    "object_character": "character_object",
    "obj_char": "character_object",
}


def canonical_category(name: str) -> str:
    """The released script's category name for a folder / task_type spelling, e.g.
    'MULTIPLE_character_object' or 'multiple_char+obj' -> 'multi_character_object'."""
    norm = re.sub(r"[\s+\-&.]+", "_", name.strip().lower()).strip("_")
    setting, _, kind = norm.partition("_")
    setting, kind = _SETTING_SPELLINGS.get(setting), _KIND_SPELLINGS.get(kind)
    if setting is None or kind is None or f"{setting}_{kind}" not in CATEGORIES:
        raise ResultsLayoutError(
            f"{name!r} is no OmniContext category; name the task folders one of {', '.join(CATEGORIES)} "
            f"(case-insensitive; 'multiple' for 'multi' is accepted)"
        )
    return f"{setting}_{kind}"


def case_overall(pf: float, sc: float) -> float:
    """Overall score of one case: the geometric mean of PF and SC (both 0-10)."""
    return com_score(pf, sc)


# ---------------------------------------------------------------- aggregation


def _case_figures(line: dict, where: str) -> dict[str, float]:
    try:
        pf, sc = float(line["PF_score"]), float(line["SC_score"])
    except KeyError as e:
        raise ResultsLayoutError(f"{where}: line {line.get('key', '?')} lacks {e.args[0]}") from None
    if not (0 <= pf <= 10 and 0 <= sc <= 10):
        raise ResultsLayoutError(f"{where}: line {line.get('key', '?')} has PF={pf}, SC={sc}; both must lie in 0-10")
    return {"PF": pf, "SC": sc, "overall": case_overall(pf, sc)}


def by_category(lines_by_task: Mapping[str, Sequence[dict]]) -> dict[str, list[dict]]:
    """Regroup {folder name: lines} under canonical category names (spellings of one category merge)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for name, lines in lines_by_task.items():
        out[canonical_category(name)].extend(lines)
    return dict(out)


def group_summary(lines_by_task: Mapping[str, Sequence[dict]]) -> dict:
    """One group's figures: per category the means of PF, SC and overall, and their average over categories."""
    per_category = {}
    for cat, lines in by_category(lines_by_task).items():
        if not lines:
            continue
        figs = [_case_figures(l, f"score_try/{cat}") for l in lines]
        per_category[cat] = {k: float(np.mean([f[k] for f in figs])) for k in FIGURES}
        per_category[cat]["n_cases"] = len(figs)
    average = {
        k: float(np.mean([v[k] for v in per_category.values()])) if per_category else float("nan") for k in FIGURES
    }
    return {"per_category": per_category, "average": average}


def summarize_groups(groups: Sequence[Mapping[str, Sequence[dict]]]) -> dict:
    """Mean and population std over groups of every per-category and average figure."""
    if not groups:
        raise ResultsLayoutError("no groups to aggregate")
    summaries = [group_summary(g) for g in groups]
    cats = [c for c in CATEGORIES if any(c in s["per_category"] for s in summaries)]
    per_category, per_category_std = {}, {}
    for c in cats:
        rows = [s["per_category"][c] for s in summaries if c in s["per_category"]]
        per_category[c] = {k: float(np.mean([r[k] for r in rows])) for k in FIGURES}
        per_category[c]["n_cases"] = rows[0]["n_cases"]
        per_category_std[c] = {k: float(np.std([r[k] for r in rows])) for k in FIGURES}
    return {
        "benchmark": "omnicontext",
        "groups": len(summaries),
        "per_category": per_category,
        "per_category_std": per_category_std,
        "average": {k: float(np.mean([s["average"][k] for s in summaries])) for k in FIGURES},
        "std": {k: float(np.std([s["average"][k] for s in summaries])) for k in FIGURES},
        "missing_categories": [c for c in CATEGORIES if c not in per_category],
        "group_results": summaries,
    }


def aggregate_omnicontext(results_dir: str | Path, model: str) -> dict:
    """Read `<results_dir>/<model>/score_try*/<category>/score.jsonl` into per-category and average PF, SC
    and overall (mean and std over the score_try groups)."""
    summary = summarize_groups(read_groups(results_dir, model))
    summary["model"] = model
    return summary


# ---------------------------------------------------------------- Table 2


def table2_row(summary: dict, figure: str = "overall") -> tuple[float | None, ...]:
    """The nine Table 2 figures of a summary (eight categories, Average); None where a category is missing."""
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}: use one of {FIGURES}")
    vals = [summary["per_category"].get(c, {}).get(figure) for c in CATEGORIES] + [summary["average"].get(figure)]
    return tuple(None if v is None or math.isnan(v) else float(v) for v in vals)


def _fmt(v: float | None, std: float | None = None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.2f}" if std is None else f"{v:.2f}±{std:.2f}"


def _named(summary_or_rows) -> list[tuple[str, dict]]:
    if isinstance(summary_or_rows, dict):
        return [(summary_or_rows.get("model", "model"), summary_or_rows)]
    return list(summary_or_rows)


def _column_titles() -> list[str]:
    return [f"{SETTING_TITLES[c.split('_', 1)[0]]} {KIND_TITLES[c.split('_', 1)[1]]}" for c in CATEGORIES] + ["Average"]


def format_omnicontext_table(
    summary_or_rows, figure: str = "overall", with_std: bool = False, context: bool = False, details: bool = True
) -> str:
    """Markdown in the layout of Scone Table 2 (overall per category and Average), for one summary or
    [(name, summary), ...]; context=True prepends the paper's rows. details=True appends, per summary,
    PF / SC / overall by category (the Table 4 figures)."""
    rows = [(f"{n} (paper)", [_fmt(v) for v in vals]) for n, vals in SCONE_TABLE2.items()] if context else []
    named = _named(summary_or_rows)
    for name, s in named:
        vals = table2_row(s, figure)
        stds: list[float | None] = [None] * len(vals)
        if with_std and s.get("groups", 1) > 1:
            spread = {"per_category": s.get("per_category_std", {}), "average": s.get("std", {})}
            stds = list(table2_row(spread, figure))
        rows.append((name, [_fmt(v, sd) for v, sd in zip(vals, stds)]))
    lines = ["| Method | " + " | ".join(_column_titles()) + " |", "|---|" + "---:|" * (len(CATEGORIES) + 1)]
    lines += ["| " + " | ".join([n, *v]) + " |" for n, v in rows]
    if details:
        for name, s in named:
            lines += ["", f"{name}: PF / SC / overall per category", ""]
            lines += ["| Category | PF | SC | Overall | cases |", "|---|---:|---:|---:|---:|"]
            for c in CATEGORIES:
                f = s["per_category"].get(c)
                if f is not None:
                    lines.append(f"| {c} | {f['PF']:.2f} | {f['SC']:.2f} | {f['overall']:.2f} | {f['n_cases']} |")
            a = s["average"]
            lines.append(f"| Average | {_fmt(a['PF'])} | {_fmt(a['SC'])} | {_fmt(a['overall'])} | |")
            if s.get("missing_categories"):
                missing = ", ".join(s["missing_categories"])
                lines.append(f"\n(missing categories: {missing}; averages over those present)")
    return "\n".join(lines)
