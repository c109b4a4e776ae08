"""MICo-Bench's Weighted-Ref-VIEScore (MICo-150K paper, Sec. 4.2 and appendix Sec. 7.4).

What is implemented, factor by factor:

* W, the visibility coefficient (Sec. 7.4.1): the mean over the case's N source images of a preservation
  score s_i in [0, 1]. A non-face source (object, clothing, scene) scores the judge's binary answer to
  "does this source element appear in the generated image" (1 or 0). A face source scores its identity
  similarity (the paper: ArcFace cosine of the best-matching face in the output) through graded bands:
  [0.45, 1] -> 1.0, [0.30, 0.45) -> 0.7, [0.15, 0.30) -> 0.5, [0.05, 0.15) -> 0.2, below 0.05 -> 0.0
  (lower edges inclusive; the paper writes the top band [0.45, 1.0), and a cosine of exactly 1, an
  identical face, is kept in it). No face found in the output counts as similarity -inf: 0.
* SC, semantic consistency (Sec. 4.2, 7.4.2): sqrt(SR * PF), subject resemblance SR judged against the
  case's human-verified reference image (not against the sources) and prompt following PF, both 0-10, so
  SC is 0-10. (Sec. 7.4.2 typesets it as sqrt(SR) x PF; Sec. 4.2's sqrt(SR x PF) is the one consistent with
  the 0-100 scores of Table 2, so that is what we use.)
* PQ, perceptual quality (Sec. 4.2, 7.4.2): the geometric mean sqrt(naturalness * artifacts) of the two
  0-10 sub-scores judged on the generated image alone (artifacts: 10 = no visible defect), 0-10.
* Score = W x SC x PQ. With W in [0, 1] and SC, PQ on 0-10 this lands on 0-100, the scale of Table 2; no
  further normalisation. Ref-VIEScore (Sec. 7.5) is the same without W: SC x PQ.

Table 2 reports the score per task group, Object(-Centric), Person (Human-Centric), HOI (Human-Object
Interaction) and De&Re, and Overall. We report Overall as the mean over all cases; the category-mean is
kept beside it (`category_mean`). The paper's table matches neither exactly (e.g. BAGEL base: Overall
19.3 while its four groups average 23.5 and their case-weighted mean is 23.6), so neither convention can
be checked against it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from data.formats.jsonl import read_jsonl
from evaluation.paper_results import MICO_TABLE2

# (lower edge, score), checked top-down: a similarity scores the first band whose edge it reaches.
IDENTITY_BANDS: tuple[tuple[float, float], ...] = ((0.45, 1.0), (0.30, 0.7), (0.15, 0.5), (0.05, 0.2))
CATEGORIES = ("object", "person", "hoi", "de_re")
CATEGORY_TITLES = {"object": "Object", "person": "Person", "hoi": "HOI", "de_re": "De&Re"}
_CATEGORY_SPELLINGS = {
    "object": "object", "objects": "object", "object_centric": "object",
    "person": "person", "human": "person", "human_centric": "person", "people": "person",
    "hoi": "hoi", "human_object_interaction": "hoi", "human_object": "hoi",
    "de_re": "de_re", "dere": "de_re", "de&re": "de_re", "decompose_and_recompose": "de_re",
    "decomposition_and_recomposition": "de_re", "de_and_re": "de_re",
}
FIGURES = ("score", "W", "SC", "PQ", "ref_viescore")

# MICo-150K Table 2, the "base" checkpoints and the closed-source systems (evaluation.paper_results).
PAPER_TABLE2 = MICO_TABLE2


def _check_0_10(name: str, v: float) -> float:
    v = float(v)
    if not 0.0 <= v <= 10.0 or math.isnan(v):
        raise ValueError(f"{name} must be a judge score in [0, 10], got {v}")
    return v


# ---------------------------------------------------------------- W


def identity_score(similarity: float | Sequence[float] | None) -> float:
    """Graded preservation of one face source from its identity cosine similarity (a sequence: the
    similarities to every face found in the output, the best one counts; empty or None: no face, 0)."""
    if similarity is None:
        return 0.0
    if isinstance(similarity, (list, tuple, np.ndarray)):
        if len(similarity) == 0:
            return 0.0
        similarity = max(float(s) for s in similarity)
    s = float(similarity)
    if math.isnan(s) or s > 1.0 + 1e-6 or s < -1.0 - 1e-6:
        raise ValueError(f"identity similarity must be a cosine in [-1, 1], got {s}")
    for edge, score in IDENTITY_BANDS:
        if s >= edge:
            return score
    return 0.0


def presence_score(present) -> float:
    """Preservation of one non-face source: the judge's yes/no, 1.0 or 0.0."""
    if isinstance(present, str):
        word = present.strip().lower()
        if word not in ("yes", "no"):
            raise ValueError(f"presence answer must be yes/no or 0/1, got {present!r}")
        return 1.0 if word == "yes" else 0.0
    if present not in (0, 1, True, False):
        raise ValueError(f"presence must be binary (0/1, True/False, yes/no), got {present!r}")
    return float(present)


def source_score(source: Mapping) -> float:
    """s_i of one source: {"present": 0|1} for a non-face source, {"identity_similarity": cos} for a face."""
    has_p, has_id = "present" in source, "identity_similarity" in source
    if has_p == has_id:
        raise ValueError(
            f"source {dict(source)}: give exactly one of 'present' (non-face source, 0/1) or "
            f"'identity_similarity' (face source, identity cosine)"
        )
    return presence_score(source["present"]) if has_p else identity_score(source["identity_similarity"])


def visibility_weight(sources: Sequence[Mapping]) -> float:
    """W = (1/N) sum_i s_i over the case's N source images."""
    if not sources:
        raise ValueError("a MICo case needs at least one source image to weight")
    return float(np.mean([source_score(s) for s in sources]))


# ---------------------------------------------------------------- SC, PQ, score


def semantic_consistency(sr: float, pf: float) -> float:
    """SC = sqrt(SR * PF), 0-10."""
    return math.sqrt(_check_0_10("SR", sr) * _check_0_10("PF", pf))


def perceptual_quality(naturalness: float, artifacts: float) -> float:
    """PQ = sqrt(naturalness * artifacts), 0-10."""
    return math.sqrt(_check_0_10("naturalness", naturalness) * _check_0_10("artifacts", artifacts))


def weighted_ref_viescore(w: float, sc: float, pq: float) -> float:
    """W x SC x PQ, 0-100."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"W must lie in [0, 1], got {w}")
    return float(w) * _check_0_10("SC", sc) * _check_0_10("PQ", pq)


def case_score(sources: Sequence[Mapping], *, pf: float, sr: float, naturalness: float, artifacts: float) -> dict:
    """Every factor of one case: W, SC, PQ, score (0-100) and Ref-VIEScore (SC x PQ, without W)."""
    w = visibility_weight(sources)
    sc = semantic_consistency(sr, pf)
    pq = perceptual_quality(naturalness, artifacts)
    return {"W": w, "SC": sc, "PQ": pq, "score": weighted_ref_viescore(w, sc, pq), "ref_viescore": sc * pq}


# ---------------------------------------------------------------- per category


def canonical_category(name: str) -> str:
    """'Object-Centric' -> 'object', 'Human-Object Interaction' -> 'hoi', 'De&Re' -> 'de_re', ..."""
    norm = re.sub(r"[\s\-]+", "_", name.strip().lower())
    cat = _CATEGORY_SPELLINGS.get(norm) or _CATEGORY_SPELLINGS.get(norm.replace("&", "_and_"))
    if cat is None:
        raise ValueError(f"{name!r} is no MICo-Bench task group; use one of Object, Person, HOI, De&Re")
    return cat


def score_row(row: Mapping) -> dict:
    """A judged case {category, sources, PF, SR, naturalness, artifacts, ...} with its figures added."""
    missing = [k for k in ("category", "sources", "PF", "SR", "naturalness", "artifacts") if k not in row]
    if missing:
        raise ValueError(f"MICo case {row.get('key', '?')} lacks {missing}")
    figs = case_score(
        row["sources"], pf=row["PF"], sr=row["SR"], naturalness=row["naturalness"], artifacts=row["artifacts"]
    )
    return {**row, "category": canonical_category(row["category"]), **figs}


def summarize(rows: Iterable[Mapping]) -> dict:
    """Per task group the mean of every figure; Overall over all cases, and the mean of the group means.
    Rows are judged cases (see score_row) or already scored ones (with 'score', 'W', 'SC', 'PQ')."""
    scored = [dict(r) if all(k in r for k in ("score", "W", "SC", "PQ")) else score_row(r) for r in rows]
    if not scored:
        raise ValueError("no MICo cases to summarize")
    for r in scored:
        r["category"] = canonical_category(r["category"])
        r.setdefault("ref_viescore", r["SC"] * r["PQ"])

    def means(rs):
        return {**{k: float(np.mean([r[k] for r in rs])) for k in FIGURES}, "n_cases": len(rs)}

    present = [c for c in CATEGORIES if any(r["category"] == c for r in scored)]
    per_category = {c: means([r for r in scored if r["category"] == c]) for c in present}
    return {
        "benchmark": "mico",
        "per_category": per_category,
        "overall": means(scored),
        "category_mean": {k: float(np.mean([v[k] for v in per_category.values()])) for k in FIGURES},
        "missing_categories": [c for c in CATEGORIES if c not in per_category],
    }


def read_cases(path: str | Path) -> list[dict]:
    """Judged cases from a JSONL file (one score_row input per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no MICo score file; write one JSON case per line "
            "(category, sources, PF, SR, naturalness, artifacts)"
        )
    return read_jsonl(path)


def format_mico_table(summary_or_rows, context: bool = False) -> str:
    """Markdown in the layout of MICo-150K Table 2 (Overall, Object, Person, HOI, De&Re), Weighted-Ref-
    VIEScore on 0-100, for one summary or [(name, summary), ...]; context=True prepends the paper's rows."""
    if isinstance(summary_or_rows, dict):
        named = [(summary_or_rows.get("model", "model"), summary_or_rows)]
    else:
        named = list(summary_or_rows)
    head = ["Overall"] + [CATEGORY_TITLES[c] for c in CATEGORIES]
    lines = ["| Model | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    if context:
        lines += [f"| {n} (paper) | " + " | ".join(f"{v:.1f}" for v in vals) + " |" for n, vals in PAPER_TABLE2.items()]
    for name, s in named:
        vals = [s["overall"]["score"]] + [s["per_category"].get(c, {}).get("score") for c in CATEGORIES]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- results layout

RESULTS_FILE = "scores.jsonl"
JUDGED_FIELDS = ("sources", "PF", "SR", "naturalness", "artifacts")


def write_results(out_dir: str | Path, rows: Iterable[Mapping]) -> Path:
    """`<out_dir>/scores.jsonl`: one judged case per line (category, sources, PF, SR, naturalness, artifacts, the
    figures of score_row and whatever else the caller keeps: key, output image path, reasons)."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    path.write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows))
    return path


def read_results(results_dir: str | Path) -> list[dict]:
    """The judged cases of a MICo-Bench results folder: its scores.jsonl, else every *.jsonl below it (a tree made
    by another tool, e.g. one file per task group)."""
    root = Path(results_dir)
    files = [root / RESULTS_FILE] if (root / RESULTS_FILE).is_file() else sorted(root.rglob("*.jsonl"))
    if not root.is_dir() or not files:
        raise FileNotFoundError(
            f"{root}: no MICo-Bench results (scores.jsonl, or *.jsonl files with one judged case per line: "
            "category, sources, PF, SR, naturalness, artifacts); run the evaluation first or check the folder")
    return [row for f in files for row in read_jsonl(f)]


def aggregate_mico(results_dir: str | Path) -> dict:
    """Per task group and overall Weighted-Ref-VIEScore of a results folder; cases that carry the judge's answers
    are scored from them again (so a tree's stored figures never disagree with this metric)."""
    rows = [score_row(r) if all(k in r for k in JUDGED_FIELDS) else r for r in read_results(results_dir)]
    summary = summarize(rows)
    summary["model"] = Path(results_dir).name
    return summary
