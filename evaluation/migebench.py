"""MIGE-Bench scoring: instruction-based subject addition and replacement (MIGE Sec. 4.2.3, Table 3).

Per case the judge gives three figures on 0-10 (evaluation.oracle_scores documents the oracle's rules):

    subject_fidelity        the new subject as the subject image shows it (MIGE's "subject preserving")
    instruction_following   the edit the instruction asks for, where it asks for it (MIGE's "editing")
    preservation            the source outside the edited region, unchanged (input-output consistency)

score = their mean. Per edit type and overall (over all cases) every figure is averaged. Cases may carry MIGE's own
feature metrics instead or beside (DINO, CLIP-I, CLIP-T against the ground-truth edit, subject_DINO and
subject_CLIP-I of the extracted subject against the subject image: evaluation.mige computes them from local encoder
weights; L1, L2 against the ground truth): they are averaged the same way, so a tree written by MIGE's own
evaluation aggregates too.

Results layout (MIGEBench's inference script saves `<idx>.jpg` per edit type):

    <dir>/add/<idx>.png, <dir>/replace/<idx>.png   the generated edits
    <dir>/scores.jsonl                              one scored case per line: key, edit_type, idx, the figures,
                                                    output_image_path, reason
    <dir>/summary.json, <dir>/table.md              the aggregate and its table
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from data.formats.jsonl import read_jsonl
from evaluation.paper_results import MIGE_TABLE3, MIGE_TABLE3_COLUMNS

EDIT_TYPES = ("addition", "replacement")
FOLDERS = {"addition": "add", "replacement": "replace"}
FIGURES = ("subject_fidelity", "instruction_following", "preservation")
FEATURE_METRICS = ("DINO", "CLIP-I", "CLIP-T", "subject_DINO", "subject_CLIP-I", "L1", "L2")
RESULTS_FILE = "scores.jsonl"
_EDIT_SPELLINGS = {"addition": "addition", "add": "addition", "subject_addition": "addition",
                   "replacement": "replacement", "replace": "replacement", "subject_replacement": "replacement"}


def canonical_edit(name: str) -> str:
    edit = _EDIT_SPELLINGS.get(str(name).strip().lower())
    if edit is None:
        raise ValueError(f"{name!r} is no MIGE-Bench edit type; use addition (add) or replacement (replace)")
    return edit


def case_score(row: Mapping) -> float | None:
    """The mean of the three figures (None when a figure is missing: a tree with feature metrics only)."""
    if not all(k in row and row[k] is not None for k in FIGURES):
        return None
    for k in FIGURES:
        v = float(row[k])
        if math.isnan(v) or not 0.0 <= v <= 10.0:
            raise ValueError(f"MIGE case {row.get('key', '?')}: {k} must lie in [0, 10], got {v}")
    return float(np.mean([float(row[k]) for k in FIGURES]))


def _means(rows: list[dict]) -> dict:
    out: dict = {}
    for k in (*FIGURES, "score", *FEATURE_METRICS):
        vals = [float(r[k]) for r in rows if r.get(k) is not None and not math.isnan(float(r[k]))]
        if vals:
            out[k] = float(np.mean(vals))
    out["n_cases"] = len(rows)
    return out


def summarize(rows: Iterable[Mapping]) -> dict:
    """Per edit type and overall means of every figure present; `score` = mean of the three oracle figures."""
    scored = []
    for r in rows:
        if "edit_type" not in r:
            raise ValueError(f"MIGE case {r.get('key', '?')} lacks edit_type (addition or replacement)")
        row = {**r, "edit_type": canonical_edit(r["edit_type"])}
        score = case_score(row)
        if score is not None:
            row["score"] = score
        elif not any(k in row for k in FEATURE_METRICS):
            raise ValueError(f"MIGE case {r.get('key', '?')} holds neither the figures {FIGURES} nor any of "
                             f"{FEATURE_METRICS}")
        scored.append(row)
    if not scored:
        raise ValueError("no MIGE cases to summarize")
    per_edit = {e: _means([r for r in scored if r["edit_type"] == e]) for e in EDIT_TYPES
                if any(r["edit_type"] == e for r in scored)}
    return {"benchmark": "mige", "per_edit": per_edit, "overall": _means(scored),
            "missing_edit_types": [e for e in EDIT_TYPES if e not in per_edit]}


def write_results(out_dir: str | Path, rows: Iterable[Mapping]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    path.write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows))
    return path


def read_results(results_dir: str | Path) -> list[dict]:
    """The scored cases of a MIGE-Bench results folder: its scores.jsonl, else every *.jsonl below it; a case
    without edit_type takes it from its folder (add/, replace/)."""
    root = Path(results_dir)
    files = [root / RESULTS_FILE] if (root / RESULTS_FILE).is_file() else sorted(root.rglob("*.jsonl"))
    if not root.is_dir() or not files:
        raise FileNotFoundError(
            f"{root}: no MIGE-Bench results (scores.jsonl, or *.jsonl files with one scored case per line: edit_type "
            f"and {', '.join(FIGURES)} or MIGE's metrics {', '.join(FEATURE_METRICS)}); run the evaluation first")
    rows = []
    for f in files:
        for row in read_jsonl(f):
            if "edit_type" not in row and f.parent != root:
                row = {**row, "edit_type": f.parent.name}
            rows.append(row)
    return rows


def aggregate_mige(results_dir: str | Path) -> dict:
    summary = summarize(read_results(results_dir))
    summary["model"] = Path(results_dir).name
    return summary


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_mige_table(summary_or_rows, context: bool = False) -> str:
    """Markdown: per edit type subject fidelity / instruction following / preservation (0-10) and L1 to the ground
    truth, then the overall score, for one summary or [(name, summary), ...]. context=True appends MIGE Table 3's
    published rows in their own columns (DINO / CLIP features: another judge, another scale)."""
    named = [(summary_or_rows.get("model", "model"), summary_or_rows)] if isinstance(summary_or_rows, dict) \
        else list(summary_or_rows)
    short = {"subject_fidelity": "SF", "instruction_following": "IF", "preservation": "Pres", "L1": "L1"}
    head = [f"{e.capitalize()} {short[k]}" for e in EDIT_TYPES for k in (*FIGURES, "L1")] + ["Overall"]
    lines = ["| Model | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name, s in named:
        vals = [s["per_edit"].get(e, {}).get(k) for e in EDIT_TYPES for k in (*FIGURES, "L1")]
        vals.append(s["overall"].get("score"))
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |")
    if context:
        cols = [f"{e.capitalize()} {c}" for e in ("replacement", "addition") for c in MIGE_TABLE3_COLUMNS]
        lines += ["", "MIGE Table 3 (published, DINO / CLIP features):", "",
                  "| Model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for name, per_edit in MIGE_TABLE3.items():
            vals = [*per_edit["replacement"], *per_edit["addition"]]
            lines.append(f"| {name} (paper) | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)
