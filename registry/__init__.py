"""MLflow tracking, the model registry and the promotion gate.

The metric names below are the one vocabulary shared by the tasks that log metrics, the gate that reads them and
the dashboards that display them; so are the run and version tags, the aliases and where the tracking store is
(`resolve_tracking_uri`). This package is the registry's face to its readers: the dashboards import nothing else
of it and talk to MLflow through mlflow's own client. Importing it is cheap: MLflow loads only with
`registry.tracking`.
"""
from __future__ import annotations

import os
from pathlib import Path

# SconeEval sub-tasks in the paper's Table 3 order: the data package owns the list.
from data.records import TASK_TYPES as SCONEEVAL_TASK_TYPES

# Run tags (registry.tracking): what a checkpoint is and which code and data made it. Copied onto model versions at
# registration.
TAG_STAGE = "scone.stage"
TAG_KIND = "scone.kind"
TAG_GIT_COMMIT = "scone.git_commit"
TAG_GIT_DIRTY = "scone.git_dirty"
TAG_DATA_HASH = "scone.data_hash"
RUN_KINDS = ("stage", "srum", "eval")
# Model versions (registry.models): the aliases and the headline scores as `metric.<name>` tags.
CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
METRIC_TAG_PREFIX = "metric."
# The promotion gate's verdict on a version (registry.gate).
TAG_DECISION = "gate.decision"
TAG_REASONS = "gate.reasons"
TAG_CHAMPION_BEFORE = "gate.champion_before"
TAG_THRESHOLDS = "gate.thresholds"


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """The tracking URI to use: `MLFLOW_TRACKING_URI` wins; a relative SQLite path is made absolute under `root`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        db = Path(uri[len(prefix):])
        if not db.is_absolute():
            db = Path(root).resolve() / db
        return prefix + str(db)
    if "://" not in uri:  # a bare path: MLflow reads it as a file store; keep it absolute too
        path = Path(uri)
        return str(path if path.is_absolute() else Path(root).resolve() / path)
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file behind a `sqlite:///` URI, None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None

# Averages on the 0-10 scale: COM (composition), DIS (distinction), Overall = (COM + DIS) / 2.
SCONEEVAL_OVERALL = "sconeeval.overall"
SCONEEVAL_COM = "sconeeval.com"
SCONEEVAL_DIS = "sconeeval.dis"

# Families the dashboards group by prefix.
SRUM_PREFIX = "srum."
T2I_PREFIX = "t2i."
# Held-out understanding accuracy (evaluation.understanding, whose PREFIX it is): understanding.yes_no,
# understanding.word, understanding.yes_rate, understanding.<question type>.yes_no / .word.
UNDERSTANDING_PREFIX = "understanding."

# Training curves read from metrics.jsonl (any numeric field is logged; these are the ones plotted).
LOSS_METRICS: tuple[str, ...] = ("loss", "fm_loss", "und_loss")


def sconeeval_metric(task_type: str, kind: str) -> str:
    """Per-task metric name, e.g. `sconeeval.distinction_cross.dis`."""
    if task_type not in SCONEEVAL_TASK_TYPES:
        raise ValueError(f"unknown SconeEval task type {task_type!r}; expected one of {', '.join(SCONEEVAL_TASK_TYPES)}")
    if kind not in ("com", "dis"):
        raise ValueError(f"SconeEval score kind must be 'com' or 'dis', got {kind!r}")
    return f"sconeeval.{task_type}.{kind}"


# The paper's Table 3 columns: composition tasks carry COM only, the distinction tasks COM and DIS.
TABLE3_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Comp. Single COM", sconeeval_metric("composition_single", "com")),
    ("Comp. Multi COM", sconeeval_metric("composition_multi", "com")),
    ("Dist. Cross COM", sconeeval_metric("distinction_cross", "com")),
    ("Dist. Cross DIS", sconeeval_metric("distinction_cross", "dis")),
    ("Dist. Intra COM", sconeeval_metric("distinction_intra", "com")),
    ("Dist. Intra DIS", sconeeval_metric("distinction_intra", "dis")),
    ("D&C Cross COM", sconeeval_metric("distinction_composition_cross", "com")),
    ("D&C Cross DIS", sconeeval_metric("distinction_composition_cross", "dis")),
    ("D&C Intra COM", sconeeval_metric("distinction_composition_intra", "com")),
    ("D&C Intra DIS", sconeeval_metric("distinction_composition_intra", "dis")),
    ("Average COM", SCONEEVAL_COM),
    ("Average DIS", SCONEEVAL_DIS),
    ("Overall", SCONEEVAL_OVERALL),
)


def sconeeval_metrics(summary: dict) -> dict[str, float]:
    """The registry's metric names for an `evaluation.sconeeval` summary (what `evaluate_checkpoint` returns).

    `average.{COM,DIS,Overall}` → `sconeeval.{com,dis,overall}`, `std.*` → `sconeeval.*_std`, and every per-task
    figure (`COM`, `DIS`, `PF`, `SC`, `DIS_acc`, ...) → `sconeeval.<task_type>.<figure lowercased>`. Figures that
    are null/NaN (a task type the benchmark lacks) are left out, so "not run" stays distinguishable from 0.
    """
    if not isinstance(summary, dict) or "average" not in summary:
        raise ValueError("not a SconeEval summary: expected the dict evaluation.runner.evaluate_checkpoint returns "
                         "(keys 'average', 'per_task', 'std')")
    out: dict[str, float] = {}

    def put(name: str, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:  # drops NaN
            out[name] = float(value)

    for key, value in summary["average"].items():
        put(f"sconeeval.{key.lower()}", value)
    for key, value in (summary.get("std") or {}).items():
        put(f"sconeeval.{key.lower()}_std", value)
    for task_type, figures in (summary.get("per_task") or {}).items():
        for key, value in figures.items():
            if key != "n_cases":
                put(f"sconeeval.{task_type}.{key.lower()}", value)
    return out


# MICo-Bench (Weighted-Ref-VIEScore, 0-100) and MIGE-Bench (0-10), scored per checkpoint beside SconeEval.
MICO_PREFIX = "mico."
MIGE_PREFIX = "mige."
MICO_OVERALL = "mico.overall"  # Weighted-Ref-VIEScore over all cases
MIGE_OVERALL = "mige.overall"  # mean of subject fidelity, instruction following and preservation over all cases
MICO_GROUPS = ("object", "person", "hoi", "de_re")  # MICo-Bench's task groups (evaluation.mico.CATEGORIES)
MIGE_EDITS = ("addition", "replacement")
MIGE_FIGURES = ("subject_fidelity", "instruction_following", "preservation")
# The report's leaderboard columns, in the papers' table order.
MICO_COLUMNS: tuple[tuple[str, str], ...] = (("Overall", MICO_OVERALL), ("Object", "mico.object.score"),
                                             ("Person", "mico.person.score"), ("HOI", "mico.hoi.score"),
                                             ("De&Re", "mico.de_re.score"), ("W", "mico.w"), ("SC", "mico.sc"),
                                             ("PQ", "mico.pq"))
MIGE_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (f"{edit[:3].capitalize()}. {short}", f"mige.{edit}.{figure}")
    for edit in MIGE_EDITS for figure, short in zip(MIGE_FIGURES, ("SF", "IF", "Pres"))
) + (("Overall", MIGE_OVERALL),)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # drops NaN


def mico_metrics(summary: dict) -> dict[str, float]:
    """Registry names for an `evaluation.mico.summarize` summary: `mico.overall` (the score), `mico.{w,sc,pq,
    ref_viescore}` over all cases and `mico.<group>.<figure>` per task group."""
    if not isinstance(summary, dict) or "overall" not in summary or "per_category" not in summary:
        raise ValueError("not a MICo-Bench summary: expected evaluation.mico.summarize's dict ('overall', 'per_category')")
    out: dict[str, float] = {}
    for key, value in summary["overall"].items():
        if key != "n_cases" and _number(value):
            out[MICO_OVERALL if key == "score" else f"mico.{key.lower()}"] = float(value)
    for group, figures in summary["per_category"].items():
        out.update({f"mico.{group}.{k.lower()}": float(v) for k, v in figures.items() if k != "n_cases" and _number(v)})
    return out


def mige_metrics(summary: dict) -> dict[str, float]:
    """Registry names for an `evaluation.migebench.summarize` summary: `mige.overall` (the score), `mige.<figure>`
    over all cases and `mige.<edit>.<figure>` per edit type (figure names lower-cased)."""
    if not isinstance(summary, dict) or "overall" not in summary or "per_edit" not in summary:
        raise ValueError("not a MIGE-Bench summary: expected evaluation.migebench.summarize's dict ('overall', 'per_edit')")
    out: dict[str, float] = {}
    for key, value in summary["overall"].items():
        if key != "n_cases" and _number(value):
            out[MIGE_OVERALL if key == "score" else f"mige.{key.lower()}"] = float(value)
    for edit, figures in summary["per_edit"].items():
        out.update({f"mige.{edit}.{k.lower()}": float(v) for k, v in figures.items() if k != "n_cases" and _number(v)})
    return out
