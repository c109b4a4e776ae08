"""Held-out understanding accuracy of a checkpoint: the `und_heldout` questions (data.understanding), per type.

Every image of the held-out set (subjects of the held-out combinations, never seen in training) is asked every
question type: presence, colour, shape, texture, count, position and scene, each in a yes / no form (one "yes"
and one "no" question per type and image) and, but for presence, a one-word form. The model answers as its
consumers read it:

- yes / no: P(yes) from the understanding expert's {yes, no} logits of the first answer token (what the self judge
  reads, `pipeline.yes_probability`); the answer is "yes" when P(yes) >= 0.5;
- one word: its greedy answer (`pipeline.answer`), right when it equals the expected answer exactly.

`score` gives the accuracy of each form per type and over all types, and the share of "yes" among the yes / no
answers (0.5 for an unbiased model, as the questions are balanced); `flat_metrics` names them for DVC and MLflow.
Chance on the yes / no questions is 0.5.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from data.catalog import UND_HELDOUT
from data.understanding import QUESTION_TYPES, YES, answer_kind

# Greedy decoding stops here: the longest one-word answer ("top left") is two tokens and <|im_end|>; anything longer
# is wrong anyway, and a model that never closes its answer costs no more than this.
MAX_ANSWER_TOKENS = 4
PREFIX = "understanding."  # MLflow metric names (registry.UNDERSTANDING_PREFIX): understanding.colour.word, ...


class Answerer(Protocol):
    """What the evaluation asks of a model (model.pipeline.BagelPipeline has both)."""

    def yes_probability(self, images, questions) -> np.ndarray: ...

    def answer(self, images, questions, *, max_new_tokens: int) -> list[str]: ...


@dataclass(frozen=True)
class Question:
    key: str  # the row's key and the question's index in it: "undh_000003#5"
    image: np.ndarray  # uint8 H x W x 3
    question: str
    answer: str
    type: str  # data.understanding.QUESTION_TYPES
    kind: str  # "yes_no" | "word"


def heldout_questions(data_root: str | Path, name: str = UND_HELDOUT) -> list[Question]:
    """Every question of the held-out set, row by row (rows validation quarantined are left out)."""
    from data.formats import scone_s2i
    from model.batching import decode_image
    from model.data_loader import quarantined_rows

    skip = {key for _, _, key in quarantined_rows(data_root, name)}
    out = []
    for row in scone_s2i.iter_rows(data_root, name):
        if row["key"] in skip:
            continue
        image = decode_image(row["image"][-1])
        types = json.loads(row["meta"])["qa_types"]
        for j, ((question, answer), kind) in enumerate(zip(json.loads(row["qa"]), types, strict=True)):
            if answer_kind(kind, answer) == "caption":
                continue
            out.append(Question(f"{row['key']}#{j}", image, question, answer, kind, answer_kind(kind, answer)))
    if not out:
        raise ValueError(f"{data_root}: dataset {name} holds no questions; build it (`scone data build {name}`)")
    return out


def answer_all(model: Answerer, questions: list[Question]) -> list[dict]:
    """Per question: the model's answer (and P(yes) for the yes / no ones) next to the expected one."""
    yes_no = [q for q in questions if q.kind == "yes_no"]
    words = [q for q in questions if q.kind == "word"]
    p_yes = model.yes_probability([q.image for q in yes_no], [q.question for q in yes_no]) if yes_no else []
    said = model.answer([q.image for q in words], [q.question for q in words],
                        max_new_tokens=MAX_ANSWER_TOKENS) if words else []
    given = {q.key: {"answer": YES if p >= 0.5 else "no", "p_yes": round(float(p), 6)} for q, p in zip(yes_no, p_yes)}
    given |= {q.key: {"answer": a} for q, a in zip(words, said)}
    return [{"key": q.key, "type": q.type, "kind": q.kind, "question": q.question, "expected": q.answer,
             **given[q.key], "right": given[q.key]["answer"] == q.answer} for q in questions]


def score(records: list[dict]) -> dict:
    """{"yes_no": accuracy, "word": accuracy, "yes_rate": share of "yes" answers to yes / no questions,
    "n_yes_no", "n_word", "per_type": {type: {"yes_no", "word", "n_yes_no", "n_word"}}}; an accuracy with no
    question behind it is left out (never 0)."""
    def acc(rs):
        return sum(r["right"] for r in rs) / len(rs) if rs else None

    by = defaultdict(list)
    for r in records:
        by[(r["type"], r["kind"])].append(r)
    yes_no = [r for r in records if r["kind"] == "yes_no"]
    words = [r for r in records if r["kind"] == "word"]
    per_type = {}
    for t in QUESTION_TYPES:
        entry = {"n_yes_no": len(by[(t, "yes_no")]), "n_word": len(by[(t, "word")])}
        for kind in ("yes_no", "word"):
            if by[(t, kind)]:
                entry[kind] = acc(by[(t, kind)])
        per_type[t] = entry
    out = {"n_yes_no": len(yes_no), "n_word": len(words), "per_type": per_type}
    if yes_no:
        out["yes_no"] = acc(yes_no)
        out["yes_rate"] = sum(r["answer"] == YES for r in yes_no) / len(yes_no)
    if words:
        out["word"] = acc(words)
    return out


def headline(summary: dict) -> dict:
    """`score`'s accuracies, nested as the DVC metrics file holds them: {"yes_no", "word", "yes_rate",
    <type>: {"yes_no", "word"}} (`dvc metrics show` reads them as yes_no, colour.yes_no, ...)."""
    out: dict = {k: round(float(summary[k]), 6) for k in ("yes_no", "word", "yes_rate") if k in summary}
    for t, entry in summary["per_type"].items():
        figures = {k: round(float(entry[k]), 6) for k in ("yes_no", "word") if k in entry}
        if figures:
            out[t] = figures
    return out


def flat_metrics(summary: dict, prefix: str = PREFIX) -> dict[str, float]:
    """`headline` as flat MLflow / registry names: <prefix>yes_no, <prefix>word, <prefix>yes_rate,
    <prefix><type>.yes_no, <prefix><type>.word."""
    return flatten(headline(summary), prefix)


def flatten(tree: dict, prefix: str = PREFIX) -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = float(value)
    return out


def evaluate_understanding(model: Answerer, data_root: str | Path) -> tuple[dict, list[dict]]:
    """(score summary, per-question records) of `model` on the held-out understanding questions."""
    records = answer_all(model, heldout_questions(data_root))
    return score(records), records


def format_summary(name: str, summary: dict) -> str:
    """One line per form: 'und_pretrain understanding yes/no 0.934 (presence 0.95, colour 0.97, ...)'."""
    lines = []
    for kind, label in (("yes_no", "yes/no"), ("word", "one-word")):
        if kind not in summary:
            continue
        parts = ", ".join(f"{t} {e[kind]:.3f}" for t, e in summary["per_type"].items() if kind in e)
        lines.append(f"{name} understanding {label} {summary[kind]:.3f} ({parts})")
    return "\n".join(lines)
