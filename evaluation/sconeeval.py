"""SconeEval scoring (Scone paper Sec. 4.3 / 5.1): formulas, the results layout, aggregation, Table 3.

Per case the judge gives prompt following PF and subject consistency SC on 0-10; COM = sqrt(PF * SC).
On the four distinction task types the judge also answers, for every reference image i and every
candidate subject j of that reference, whether the candidate appears in the output (0/1). These
predictions are flattened and compared with `subject_label` into accuracy, precision, recall and F1
(each x10, so they share COM's 0-10 scale); DIS = (accuracy + F1) / 2 per case.

Per task type the case figures are averaged; the average COM runs over the six task types, the
average DIS over the four distinction types, Overall = (COM + DIS) / 2.

The protocol repeats the whole thing over 3 sampling rounds x 3 scorings; the reported figure is the
mean of the 9 group results and the spread their standard deviation (population std, ddof=0).

Results layout (the Scone evaluation code's, extended so that all 9 groups fit in it):

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
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from data.records import TASK_TYPES  # the six SconeEval sub-tasks, in Table 3 order
DISTINCTION_TYPES = tuple(t for t in TASK_TYPES if "distinction" in t)
# The released Scone evaluation script names the distinction folders differently.
TASK_TYPE_ALIASES = {
    "distinction_single_cross": "distinction_cross",
    "distinction_single_intra": "distinction_intra",
    "distinction_multi_cross": "distinction_composition_cross",
    "distinction_multi_intra": "distinction_composition_intra",
}
DIS_FIELDS = ("DIS_acc", "DIS_prec", "DIS_recall", "DIS_f1")
SCORE_FILE = "score.jsonl"


class ResultsLayoutError(ValueError):
    """A results tree that cannot be aggregated; the message names the path and the fix."""


def is_distinction(task_type: str) -> bool:
    return "distinction" in task_type


def canonical_task_type(name: str) -> str:
    return TASK_TYPE_ALIASES.get(name, name)


# ---------------------------------------------------------------- per-case formulas


def com_score(pf: float, sc: float) -> float:
    """Composition score of one case: geometric mean of PF and SC (both 0-10)."""
    if pf < 0 or sc < 0:
        raise ValueError(f"PF and SC must be >= 0, got PF={pf}, SC={sc}")
    return math.sqrt(pf * sc)


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
        for f in sorted(try_dir.glob(f"*/*.jsonl")):
            task_type = canonical_task_type(f.parent.name)
            for n, raw in enumerate(f.read_text().splitlines(), 1):
                if not raw.strip():
                    continue
                try:
                    lines_by_task[task_type].append(json.loads(raw))
                except json.JSONDecodeError as e:
                    raise ResultsLayoutError(f"{f}:{n}: not valid JSON ({e})") from None
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
    return {"per_task": per_task, "average": {"COM": com, "DIS": dis, "Overall": (com + dis) / 2}}


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
    avg = {k: float(np.mean([s["average"][k] for s in summaries])) for k in ("COM", "DIS", "Overall")}
    std = {k: float(np.std([s["average"][k] for s in summaries])) for k in ("COM", "DIS", "Overall")}
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


def flat_metrics(summary: dict, prefix: str = "sconeeval/") -> dict[str, float]:
    """Flat name -> value view of a summary for metric trackers (MLflow)."""
    out = {}
    for k, v in summary["average"].items():
        out[f"{prefix}{k}"] = v
        out[f"{prefix}{k}_std"] = summary["std"][k]
    for t, figs in summary["per_task"].items():
        for k, v in figs.items():
            if k != "n_cases":
                out[f"{prefix}{t}/{k}"] = v
    return {k: float(v) for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


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

# Scone paper, Table 3 (GPT-4.1 judge, 1024px): context rows for leaderboards, in TABLE3_COLUMNS order.
PAPER_TABLE3: dict[str, tuple[float | None, ...]] = {
    "GPT-4o": (8.92, 8.51, 9.18, 8.55, 9.45, 9.01, 8.83, 8.49, 8.99, 9.56, 8.98, 8.90, 8.94),
    "Gemini-2.5-Flash-Image": (8.87, 7.94, 9.12, 9.15, 9.00, 8.50, 8.27, 8.87, 8.17, 8.85, 8.56, 8.84, 8.70),
    "Qwen-Image-Edit-2509": (8.54, 6.85, 8.85, 8.57, 7.32, 6.86, 7.53, 8.13, 7.49, 7.02, 7.76, 7.65, 7.70),
    "BAGEL": (7.14, 5.55, 7.49, 7.95, 6.93, 6.21, 6.44, 7.38, 6.87, 7.27, 6.74, 7.20, 6.97),
    "OmniGen2": (8.00, 6.59, 8.31, 8.99, 6.99, 6.80, 7.28, 8.30, 7.14, 7.13, 7.39, 7.81, 7.60),
    "Echo-4o": (8.58, 7.73, 8.36, 8.33, 7.74, 7.18, 7.87, 8.72, 8.01, 8.33, 8.05, 8.14, 8.09),
    "Scone": (8.52, 7.40, 8.98, 9.73, 7.97, 7.74, 8.20, 9.25, 8.21, 8.44, 8.21, 8.79, 8.50),
}


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
        rows += [(f"{name} (paper)", [_fmt(v) for v in vals]) for name, vals in PAPER_TABLE3.items()]
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


# ---------------------------------------------------------------- CLI-facing


def format_task_table(summary: dict) -> str:
    """Per-task PF / SC / COM (and DIS where present) as markdown: for layouts other than SconeEval's
    six task types (OmniContext-style trees)."""
    lines = ["| Task | PF | SC | COM | DIS |", "|---|---:|---:|---:|---:|"]
    for t, f in summary["per_task"].items():
        lines.append(f"| {t} | {f['PF']:.2f} | {f['SC']:.2f} | {f['COM']:.2f} | {_fmt(f.get('DIS'))} |")
    avg = summary["average"]
    lines.append(f"| Average | | | {_fmt(avg['COM'])} | {_fmt(None if math.isnan(avg['DIS']) else avg['DIS'])} |")
    return "\n".join(lines)


def aggregate_command(results_dir: str | Path, model: str, benchmark: str = "sconeeval", out: str | Path | None = None) -> str:
    """`scone eval aggregate`: aggregate a results tree, write the summary JSON to `out` (a file path)
    and return the table (Table 3 layout for SconeEval, per-task otherwise) as markdown."""
    if benchmark not in ("sconeeval", "omnicontext"):
        raise ValueError(f"unknown benchmark {benchmark!r}: use sconeeval or omnicontext")
    if benchmark == "sconeeval":
        summary = aggregate(results_dir, model)
        table = format_table3(summary, style="markdown", with_std=True)
        if summary["missing_task_types"]:
            table += f"\n\n(missing task types: {', '.join(summary['missing_task_types'])}; averages over those present)"
    else:
        from evaluation.omnicontext import aggregate_omnicontext, format_omnicontext_table

        summary = aggregate_omnicontext(results_dir, model)
        table = format_omnicontext_table(summary, with_std=True)
    summary["benchmark"] = benchmark
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(summary_json(summary))
    return table


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
