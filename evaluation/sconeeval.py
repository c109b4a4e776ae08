"""SconeEval scoring (Scone paper Sec. 4.3 / 5.1): formulas, the results layout, aggregation, Table 3.

Per case the judge gives prompt following PF and subject consistency SC on 0-10; COM = sqrt(PF * SC).
On the four distinction task types the judge also answers, for every reference image i and every
candidate subject j of that reference, whether the candidate appears in the output (0/1). These
predictions are flattened and compared with `subject_label` into accuracy, precision, recall and F1
(each x10, so they share COM's 0-10 scale); DIS = (accuracy + F1) / 2 per case.

Per task type the case figures are averaged; the average COM runs over the six task types, the
average DIS over the four distinction types, Overall = (COM + DIS) / 2. The average PF and SC (over the
task types, as COM) stand beside them, as the reference aggregation prints them.

The protocol repeats the whole thing over 3 sampling rounds x 3 scorings; the reported figure is the
mean of the 9 group results and the spread their standard deviation (population std, ddof=0).

Results layout (evaluation.results; the Scone evaluation code's, extended so that all 9 groups fit in it):

    <results_dir>/<model>/score_try{g}/<task_type>/score.jsonl

One `score_try{g}` folder holds one *group*: one sampling round scored once. Our runner numbers them
round-major, g = round * scorings + scoring + 1, so score_try1..3 are the three scorings of the first
sampling round, exactly what the Scone tool writes for one set of samples; every line also carries
`round` and `scoring`. A line may instead hold its repeated scorings as a list under `scorings`
(each entry with PF_score, SC_score, DIS_*): such a folder then counts as len(scorings) groups.
Folder and task-type names of the Scone tool (`distinction_single_cross`, ...) are read too.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from data.records import TASK_TYPES  # the six SconeEval sub-tasks, in Table 3 order
# the results layout and the composition score, shared with evaluation.omnicontext
from evaluation.paper_results import SCONE_TABLE3  # the paper's rows, shown as context
from evaluation.results import ResultsLayoutError, com_score, read_groups

DISTINCTION_TYPES = tuple(t for t in TASK_TYPES if "distinction" in t)
DIS_FIELDS = ("DIS_acc", "DIS_prec", "DIS_recall", "DIS_f1")
AVERAGE_FIGURES = ("COM", "DIS", "Overall", "PF", "SC")  # a summary's `average` (and `std`) keys


def is_distinction(task_type: str) -> bool:
    return "distinction" in task_type


# ---------------------------------------------------------------- per-case formulas


def distinction_metrics(labels: Sequence[Sequence[int]], predictions: Sequence[Sequence[int]]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and DIS of one case, on the 0-10 scale.

    `labels` is the case's `subject_label` (one list per reference image, 1 = the candidate must
    appear), `predictions` the judge's presence answers in the same shape. Both are flattened.

    Precision, recall and F1 are 0 when undefined (no positive prediction, no positive label).
    F1 is the harmonic mean 2PR / (P + R). The paper's prose calls F1 "the average of precision
    and recall", but its released scoring code uses the standard F1 (harmonic mean); we implement
    the harmonic mean so that our figures are comparable with the published leaderboard numbers.
    DIS = (accuracy + F1) / 2.
    """
    if len(labels) != len(predictions) or any(len(a) != len(b) for a, b in zip(labels, predictions)):
        raise ValueError(
            f"presence predictions {list(map(list, predictions))} do not have the shape of subject_label "
            f"{list(map(list, labels))}: one 0/1 answer per candidate of each reference image"
        )
    y = np.array([int(v) for row in labels for v in row], dtype=int)
    p = np.array([int(v) for row in predictions for v in row], dtype=int)
    if not set(np.unique(np.concatenate([y, p])).tolist()) <= {0, 1}:
        raise ValueError(f"labels and predictions must be 0/1, got labels={y.tolist()} predictions={p.tolist()}")
    if y.size == 0:
        raise ValueError("a distinction case needs at least one candidate subject in subject_list")
    tp = int(((p == 1) & (y == 1)).sum())
    fp = int(((p == 1) & (y == 0)).sum())
    fn = int(((p == 0) & (y == 1)).sum())
    acc = float((p == y).mean())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    out = {"DIS_acc": 10 * acc, "DIS_prec": 10 * prec, "DIS_recall": 10 * rec, "DIS_f1": 10 * f1}
    out["DIS"] = (out["DIS_acc"] + out["DIS_f1"]) / 2
    return out


def score_line(
    case,
    pf: float,
    sc: float,
    reasons: tuple[str, str] | str = ("", ""),
    presence: Sequence[Sequence[int]] | None = None,
    presence_reasons: Sequence[Sequence[str]] | None = None,
    **extra,
) -> dict:
    """One line of score.jsonl for `case` (anything with key, task_type, case_type, instruction,
    subject_label): the Scone fields plus COM and, for distinction types, the DIS figures."""
    pf_reason, sc_reason = (reasons, reasons) if isinstance(reasons, str) else reasons
    line = {
        "key": case.key,
        "task_type": case.task_type,
        "case_type": getattr(case, "case_type", ""),
        "instruction": getattr(case, "instruction", ""),
        "PF_score": float(pf),
        "PF_score_reason": pf_reason,
        "SC_score": float(sc),
        "SC_score_reason": sc_reason,
        "COM": com_score(pf, sc),
    }
    if is_distinction(case.task_type):
        if presence is None:
            raise ValueError(f"case {case.key}: task type {case.task_type} needs presence predictions for DIS")
        m = distinction_metrics(case.subject_label, presence)
        line.update(m)
        line["DIS_overall"] = m["DIS"]
        line["DIS_pred"] = [list(map(int, row)) for row in presence]
        if presence_reasons is not None:
            line["DIS_reasons"] = [list(r) for r in presence_reasons]
    line.update(extra)
    return line


# ---------------------------------------------------------------- results layout


# ---------------------------------------------------------------- aggregation


def _case_figures(line: dict, task_type: str, where: str) -> dict[str, float]:
    try:
        pf, sc = float(line["PF_score"]), float(line["SC_score"])
    except KeyError as e:
        raise ResultsLayoutError(f"{where}: line {line.get('key', '?')} lacks {e.args[0]}") from None
    out = {"PF": pf, "SC": sc, "COM": com_score(pf, sc)}
    if is_distinction(task_type):
        missing = [f for f in DIS_FIELDS if f not in line]
        if missing:
            raise ResultsLayoutError(f"{where}: distinction line {line.get('key', '?')} lacks {missing}")
        for f in DIS_FIELDS:
            out[f] = float(line[f])
        out["DIS"] = (out["DIS_acc"] + out["DIS_f1"]) / 2
    return out


def group_summary(lines_by_task: Mapping[str, Sequence[dict]]) -> dict:
    """One group's figures: per task type the mean of the case figures, and the averages."""
    per_task = {}
    for task_type, lines in lines_by_task.items():
        if not lines:
            continue
        figs = [_case_figures(l, task_type, f"score_try/{task_type}") for l in lines]
        per_task[task_type] = {k: float(np.mean([f[k] for f in figs])) for k in figs[0]}
        per_task[task_type]["n_cases"] = len(figs)
    coms = [v["COM"] for v in per_task.values()]
    diss = [v["DIS"] for t, v in per_task.items() if is_distinction(t)]
    com = float(np.mean(coms)) if coms else float("nan")
    dis = float(np.mean(diss)) if diss else float("nan")
    # overall PF and SC means over the task types, as the reference aggregation prints them beside COM and DIS
    pf = float(np.mean([v["PF"] for v in per_task.values()])) if per_task else float("nan")
    sc = float(np.mean([v["SC"] for v in per_task.values()])) if per_task else float("nan")
    return {"per_task": per_task, "average": {"COM": com, "DIS": dis, "Overall": (com + dis) / 2, "PF": pf, "SC": sc}}


def summarize_groups(groups: Sequence[Mapping[str, Sequence[dict]]]) -> dict:
    """Mean and std (ddof=0) over groups of every per-task and average figure."""
    if not groups:
        raise ResultsLayoutError("no groups to aggregate")
    summaries = [group_summary(g) for g in groups]
    task_types = sorted({t for s in summaries for t in s["per_task"]}, key=_task_order)
    per_task, per_task_std = {}, {}
    for t in task_types:
        rows = [s["per_task"][t] for s in summaries if t in s["per_task"]]
        keys = [k for k in rows[0] if k != "n_cases"]
        per_task[t] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        per_task[t]["n_cases"] = rows[0]["n_cases"]
        per_task_std[t] = {k: float(np.std([r[k] for r in rows])) for k in keys}
    avg = {k: float(np.mean([s["average"][k] for s in summaries])) for k in AVERAGE_FIGURES}
    std = {k: float(np.std([s["average"][k] for s in summaries])) for k in AVERAGE_FIGURES}
    return {
        "groups": len(summaries),
        "per_task": per_task,
        "per_task_std": per_task_std,
        "average": avg,
        "std": std,
        "missing_task_types": [t for t in TASK_TYPES if t not in per_task],
        "group_results": summaries,
    }


def _task_order(t: str) -> tuple[int, str]:
    return (TASK_TYPES.index(t) if t in TASK_TYPES else len(TASK_TYPES), t)


def aggregate(results_dir: str | Path, model: str) -> dict:
    """Read every group of `<results_dir>/<model>/score_try*/` (ours or the Scone tool's) into
    per-task and average figures, mean and std over the groups."""
    summary = summarize_groups(read_groups(results_dir, model))
    summary["model"] = model
    return summary


# ---------------------------------------------------------------- Table 3

TABLE3_COLUMNS = (
    ("composition_single", "COM"),
    ("composition_multi", "COM"),
    ("distinction_cross", "COM"),
    ("distinction_cross", "DIS"),
    ("distinction_intra", "COM"),
    ("distinction_intra", "DIS"),
    ("distinction_composition_cross", "COM"),
    ("distinction_composition_cross", "DIS"),
    ("distinction_composition_intra", "COM"),
    ("distinction_composition_intra", "DIS"),
    ("average", "COM"),
    ("average", "DIS"),
    ("average", "Overall"),
)
_GROUP_HEADERS = (("Composition", 2), ("Distinction", 4), ("Distinction & Composition", 4), ("Average", 3))
_SUB_HEADERS = ("Single", "Multi", "Cross", "", "Intra", "", "Cross", "", "Intra", "", "", "", "")


def table3_row(summary: dict) -> tuple[float | None, ...]:
    """The 13 Table 3 figures of a summary (None where a task type is missing)."""
    vals = []
    for task, fig in TABLE3_COLUMNS:
        if task == "average":
            v = summary["average"].get(fig)
        else:
            v = summary["per_task"].get(task, {}).get(fig)
        vals.append(None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
    return tuple(vals)


def _fmt(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if std is None else f"{v:.2f}±{std:.2f}"


def _rows(summary_or_rows, with_std: bool, context: bool) -> list[tuple[str, list[str]]]:
    if isinstance(summary_or_rows, dict):
        summary_or_rows = [(summary_or_rows.get("model", "model"), summary_or_rows)]
    rows = []
    if context:
        rows += [(f"{name} (paper)", [_fmt(v) for v in vals]) for name, vals in SCONE_TABLE3.items()]
    for name, s in summary_or_rows:
        vals = table3_row(s)
        stds: list[float | None] = [None] * len(vals)
        if with_std and s.get("groups", 1) > 1:
            std_summary = {"per_task": s.get("per_task_std", {}), "average": s.get("std", {})}
            stds = list(table3_row(std_summary))
        rows.append((name, [_fmt(v, sd) for v, sd in zip(vals, stds)]))
    return rows


def format_table3(summary_or_rows, style: str = "markdown", with_std: bool = False, context: bool = False) -> str:
    """Render one summary (or [(name, summary), ...]) in the layout of the Scone paper's Table 3.

    style: "markdown" (a pipe table with the two header rows folded into one), "plain" (aligned text
    with the three header rows of the paper), or "rich" (the console table, exported as text).
    context=True prepends the paper's published rows."""
    rows = _rows(summary_or_rows, with_std, context)
    if style == "rich":
        return _rich_text(rows)
    if style == "markdown":
        header = ["Method"] + [
            f"{grp} {sub} {fig}".replace("  ", " ")
            for grp, sub, fig in zip(_group_per_column(), _filled_sub_headers(), (f for _, f in TABLE3_COLUMNS))
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(TABLE3_COLUMNS)) + "|"]
        lines += ["| " + " | ".join([name] + vals) + " |" for name, vals in rows]
        return "\n".join(lines)
    if style == "plain":
        return _plain(rows)
    raise ValueError(f"unknown table style {style!r}: use markdown, plain or rich")


def _group_per_column() -> list[str]:
    out = []
    for name, span in _GROUP_HEADERS:
        out += [{"Composition": "Comp.", "Distinction": "Dist.", "Distinction & Composition": "Dist&Comp"}.get(name, "Avg")] * span
    return out


def _filled_sub_headers() -> list[str]:
    out, last = [], ""
    for i, h in enumerate(_SUB_HEADERS):
        last = h if h or i >= 10 else last
        out.append(last if i < 10 else "")
    return out


def _plain(rows: list[tuple[str, list[str]]]) -> str:
    head1 = [""] + [g for g, span in _GROUP_HEADERS for g in [g] + [""] * (span - 1)]
    head2 = ["Method"] + list(_SUB_HEADERS)
    head3 = [""] + [f for _, f in TABLE3_COLUMNS]
    table = [head1, head2, head3] + [[n] + v for n, v in rows]
    widths = [max(len(r[i]) for r in table[1:]) for i in range(len(head2))]
    # group titles may be wider than their columns: let them overflow into the span
    lines = []
    title = ""
    col = 0
    for g, span in _GROUP_HEADERS:
        start = sum(widths[: 1 + col]) + 2 * (1 + col)
        title = (title + " " if len(title) >= start else title.ljust(start)) + g
        col += span
    lines.append(title.rstrip())
    for r in table[1:]:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


def rich_table3(summary_or_rows, with_std: bool = False, context: bool = False):
    """The Table 3 layout as a rich.table.Table for console output."""
    from rich.table import Table

    rows = _rows(summary_or_rows, with_std, context)
    table = Table(title="SconeEval (Table 3 layout)")
    table.add_column("Method")
    for grp, sub, (_, fig) in zip(_group_per_column(), _filled_sub_headers(), TABLE3_COLUMNS):
        table.add_column(f"{grp}\n{sub}\n{fig}".replace("\n\n", "\n"), justify="right")
    for name, vals in rows:
        table.add_row(name, *vals)
    return table


def _rich_text(rows) -> str:
    import io

    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO(), color_system=None)
    table = rich_table3([], with_std=False)
    for name, vals in rows:
        table.add_row(name, *vals)
    console.print(table)
    return console.export_text()


def summary_json(summary: dict) -> str:
    """Strict JSON of a summary: NaN (a figure with no task type behind it) becomes null."""

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(summary), indent=2, sort_keys=True, allow_nan=False)
