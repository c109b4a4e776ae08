"""The report's Diagnostics section: per checkpoint the figures evaluation.diagnostics computed in the evaluate
step (its MLflow run's `diagnostics.*` metrics) and, from `<scores>/<name>/diagnostics/` (data.layout's
`diagnostics_dir`), its contact sheet and the overlay it showcases (named in that folder's diagnostics.json), copied beside the page.

The metric prefix and file names are spelled out here rather than imported: the report depends on what the
evaluate step wrote, not on the code that computes it (tests/test_eval_diagnostics.py checks they agree).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from data.layout import ArtifactLayout

PREFIX = "diagnostics."  # evaluation.diagnostics.DIAG_PREFIX
DETAILS = "diagnostics.json"  # evaluation.diagnostics.FILES["details"]
COLUMNS = (  # (header, metric name after PREFIX): evaluation.diagnostics.headline
    ("bridge AUC", "bridge_auc"),
    ("AUC vs distractors", "bridge_auc_distractors"),
    ("kept: referred", "bridge_kept_referred"),
    ("kept: other", "bridge_kept_other"),
    ("self vs oracle global r", "self_oracle_global_r"),
    ("global sign agreement", "self_oracle_global_sign"),
    ("region r", "self_oracle_region_r"),
    ("region sign agreement", "self_oracle_region_sign"),
)


def _pictures(folder: Path, out_dir: Path, slug: str) -> dict:
    """{contact_sheet, overlay}: paths relative to the page, of copies in out_dir/diagnostics/ (None if absent)."""
    found = {"contact_sheet": None, "overlay": None, "overlay_name": None}
    try:
        named = json.loads((folder / DETAILS).read_text()).get("pictures") or {}
    except (OSError, ValueError, AttributeError):
        return found
    for kind in ("contact_sheet", "overlay"):
        rel = named.get(kind)
        if not isinstance(rel, str) or not (folder / rel).is_file():
            continue
        dst = out_dir / "diagnostics" / f"{slug}_{kind}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, dst)
        found[kind] = f"diagnostics/{dst.name}"
        if kind == "overlay":
            found["overlay_name"] = Path(rel).stem
    return found


def diagnostics_section(ckpts: Sequence, layout: ArtifactLayout, out_dir: Path) -> dict:
    """What the template's Diagnostics section shows: one row per checkpoint (cells None: not run)."""
    rows = []
    for c in ckpts:
        values = [c.metrics.get(PREFIX + k) for _, k in COLUMNS]
        ran = any(k.startswith(PREFIX) for k in c.metrics)
        cells = [("n/a" if v is None else f"{v:.2f}") for v in values] if ran else None
        rows.append({"label": c.label, "cells": cells,
                     **_pictures(layout.diagnostics_dir(c.name), Path(out_dir), c.slug)})
    return {"labels": [label for label, _ in COLUMNS], "rows": rows}
