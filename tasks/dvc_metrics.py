"""The small files DVC reads as metrics and plots (`dvc metrics show|diff`, `dvc plots show`, `dvc exp show`).

Each is declared as a (non-cached) metrics or plots output of its stage in dvc.yaml and written atomically
after the stage's main output has been published.
"""
from __future__ import annotations

from pathlib import Path

from tasks.atomic import write_json

LOSS_FIELDS = ("step", "loss", "fm_loss", "und_loss", "l_r", "l_ref", "lr")


def headline_scores(summary: dict, t2i: dict) -> dict[str, float]:
    """Per checkpoint: SconeEval's averages (0-10) and the compositional T2I accuracy (0-1)."""
    average = summary.get("average", {})
    out = {f"sconeeval_{k.lower()}": round(float(v), 6) for k, v in average.items() if isinstance(v, (int, float))}
    out["t2i_accuracy"] = round(float(t2i.get("mean", 0.0)), 6)
    return out


def heldout_headline(metrics: dict[str, float]) -> dict[str, float]:
    """Per checkpoint, the DVC metrics file of MICo-Bench or MIGE-Bench: from the registry's names of one benchmark
    (registry.mico_metrics / mige_metrics) the overall figures and each group's score, `.` spelled `_`
    (`mico_overall`, `mico_w`, `mico_object_score`, `mige_preservation`, `mige_addition_score`, ...)."""
    keep = {k: v for k, v in metrics.items() if k.count(".") == 1 or k.endswith(".score")}
    return {k.replace(".", "_"): round(float(v), 6) for k, v in sorted(keep.items())}


def write_loss_curve(metrics_jsonl: Path, out: Path) -> None:
    """The training log as a JSON list of rows (DVC's plots read JSON, CSV or YAML, not JSON lines)."""
    from data.formats.jsonl import read_jsonl

    rows = [{k: r[k] for k in LOSS_FIELDS if r.get(k) is not None} for r in read_jsonl(metrics_jsonl)]
    write_json(out, rows)
