"""The chain's HTML report: SconeEval leaderboard per checkpoint (paper Table 3 layout, with the paper's rows as
context), training curves, gate decisions, SRUM and T2I metrics, and sample generations.

It reads only the MLflow registry/runs (through mlflow's client; the tag and metric names and the store's location
from the `registry` package, none of its modules) and files under `artifacts/`, each where data.layout's one
artifact map puts it (the map the steps write by); whatever is missing shows as "not run".
The page is one self-contained HTML file with inline CSS; its PNGs sit next to it (relative links), so the
`reports/` folder can be copied or published as is. The HTML lives in jinja2 templates (dashboards/templates/,
autoescaped); this module gathers what they show. The Data validation section links to the Great Expectations
Data Docs of the validate stage (artifacts/validation/gx/) by a relative link from the published folder.

    python -m dashboards.report --artifacts artifacts --data artifacts/data --model scone-tiny

Over 400 lines on purpose: the report's data gathering for every section in one place; rendering is in the jinja2
templates and dashboards/diagnostics.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from data.formats.jsonl import ignore_bad_line, read_jsonl
from data.layout import CARD, CONTACT_SHEET, ArtifactLayout
from evaluation.paper_results import SCONE_TABLE3
# the metric and tag vocabulary shared with the tasks that log them (constants only: the report talks to MLflow itself)
from registry import (CHAMPION_ALIAS, LOSS_METRICS, METRIC_TAG_PREFIX, MICO_COLUMNS, MIGE_COLUMNS, SCONEEVAL_OVERALL,
                      SRUM_PREFIX, T2I_PREFIX, TABLE3_COLUMNS, UNDERSTANDING_PREFIX, TAG_CHAMPION_BEFORE, TAG_DECISION, TAG_KIND,
                      TAG_REASONS, TAG_STAGE, resolve_tracking_uri, sqlite_path)

# Rows of the Scone paper's Table 3 (evaluation.paper_results; TABLE3_COLUMNS order) shown beside ours.
# Context only: our tiny model is judged by the oracle on 32 px renders, so the numbers are not comparable, the
# layout is.
PAPER_ROWS: dict[str, tuple[float | None, ...]] = {
    "BAGEL† (paper, base model)": SCONE_TABLE3["BAGEL"],
    "Scone (paper)": SCONE_TABLE3["Scone"],
}
MAX_SAMPLES_PER_CHECKPOINT = 8
THUMBNAIL_PX = 96

TEMPLATES = Path(__file__).with_name("templates")


@dataclass
class Checkpoint:
    """One registered model version (or an unregistered stage found on disk)."""

    name: str
    version: str | None = None
    run_id: str | None = None
    kind: str = "stage"
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version else self.name

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in self.label.replace(" ", "_"))


def _fmt(v: float | None) -> str:
    return "not run" if v is None else f"{v:.2f}"


@lru_cache(maxsize=1)
def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = _fmt
    return env


def render(template: str, **context) -> str:
    """Render one of dashboards/templates/ (autoescaped: values are text, never markup)."""
    return _env().get_template(template).render(**context)


def _portable_uri(uri: str) -> str:
    """A SQLite store inside the working directory is named relative to it (the report is an artifact)."""
    db = sqlite_path(uri)
    if db is not None and db.is_absolute() and db.resolve().is_relative_to(Path.cwd().resolve()):
        return "sqlite:///" + db.resolve().relative_to(Path.cwd().resolve()).as_posix()
    return uri


def _open_client(tracking_uri: str, root: Path):
    """(client, note): None when the store does not exist (a report must not create an empty database)."""
    uri = resolve_tracking_uri(tracking_uri, root)
    db = sqlite_path(uri)
    # the note names the store as configured (relative under the embedded default): the report is an artifact
    # and must not carry this machine's absolute paths
    shown = _portable_uri(uri)
    if db is not None and not db.exists():
        return None, f"MLflow store {shown} not found: nothing registered yet"
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri), shown


def collect_checkpoints(client, model_name: str) -> list[Checkpoint]:
    """Every version of `model_name`, oldest first, with its metrics (the run's latest metric values, completed
    by the version's `metric.*` tags) and tags; straight from the MLflow client."""
    from mlflow.exceptions import MlflowException

    versions = sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda mv: int(mv.version))
    # search results leave ModelVersion.aliases empty; the registered model holds the alias → version map
    aliases: dict[str, list[str]] = {}
    if versions:
        for alias, version in client.get_registered_model(model_name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    out = []
    for mv in versions:
        tags = dict(mv.tags or {})
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics.update(client.get_run(mv.run_id).data.metrics)
            except MlflowException:
                pass  # run deleted or in another store: the tags still carry the registered metrics
        for key, value in tags.items():
            if key.startswith(METRIC_TAG_PREFIX):
                try:
                    metrics[key[len(METRIC_TAG_PREFIX):]] = float(value)
                except ValueError:
                    continue
        out.append(Checkpoint(
            name=tags.get(TAG_STAGE, f"version {mv.version}"), version=str(mv.version), run_id=mv.run_id,
            kind=tags.get(TAG_KIND, "stage"), aliases=sorted(aliases.get(str(mv.version), [])), metrics=metrics, tags=tags,
        ))
    return out


def _metrics_jsonl_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in LOSS_METRICS}
    for rec in read_jsonl(path, ignore_bad_line):  # a file training may still be appending to
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        for k in LOSS_METRICS:
            if isinstance(rec.get(k), (int, float)):
                series[k].append((int(rec["step"]), float(rec[k])))
    return series


def loss_series(client, ckpt: Checkpoint, layout: ArtifactLayout) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """Training curves of a checkpoint: the MLflow metric history of its run, else its training log on disk."""
    if client is not None and ckpt.run_id:
        series = {k: [(m.step, m.value) for m in client.get_metric_history(ckpt.run_id, k)] for k in LOSS_METRICS}
        if any(series.values()):
            return series, "MLflow"
    path = layout.train_log(ckpt.name)
    if path.exists():
        return _metrics_jsonl_series(path), str(path)
    return {}, ""


def _summary_path(ckpt: Checkpoint, layout: ArtifactLayout) -> Path | None:
    """The checkpoint's SconeEval summary (the evaluate step's), None before it is scored."""
    path = layout.sconeeval_summary(ckpt.name)
    return path if path.exists() else None


def sample_paths(summary_path: Path) -> list[Path]:
    """Generated images a summary.json lists under `sample_images` (evaluation.runner) or `samples`: paths,
    objects with `path`/`image`, or a mapping key → path. Relative paths are relative to the summary's folder; files that no longer exist are skipped."""
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    raw = None
    if isinstance(summary, dict):
        raw = summary.get("sample_images", summary.get("samples"))
    if isinstance(raw, dict):
        raw = list(raw.values())
    paths = []
    for item in raw or []:
        if isinstance(item, dict):
            item = item.get("path") or item.get("image")
        if isinstance(item, str):
            p = Path(item)
            p = p if p.is_absolute() else summary_path.parent / p
            if p.exists():
                paths.append(p)
    return paths[:MAX_SAMPLES_PER_CHECKPOINT]


def _thumbnail(src: Path, dst: Path) -> Path:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            # tiny renders are enlarged with nearest neighbour (crisp pixels); large ones shrink smoothly
            resample = Image.Resampling.NEAREST if max(im.size) < THUMBNAIL_PX else Image.Resampling.LANCZOS
            im.resize((THUMBNAIL_PX, THUMBNAIL_PX), resample).save(dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


# ---------------------------------------------------------------- what each section shows (the HTML: templates/)


def _datacards(layout: ArtifactLayout, out_dir: Path) -> list[dict]:
    """One row per dataset card (data.card.write_card): counts, sizes, instruction lengths, contact sheet."""
    rows = []
    for name in layout.datacard_names():
        card = json.loads((layout.datacard(name) / CARD).read_text())
        words = card.get("instruction_words") or {}
        sheet = layout.datacard(name) / CONTACT_SHEET
        img = None
        if sheet.exists():
            dst = out_dir / "datacards" / f"{name}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sheet, dst)
            img = f"datacards/{dst.name}"
        rows.append({
            "name": card.get("name", name), "rows": card.get("rows", "-"),
            "counts": ", ".join(f"{k} {v}" for k, v in sorted((card.get("task_type") or {}).items())) or "-",
            "sizes": ", ".join(f"{k}: {v}" for k, v in (card.get("image_sizes") or {}).items()) or "-",
            "length": f"mean {words['mean']:.1f}, max {words['max']}" if "mean" in words else "-",
            "img": img, "alt": f"contact sheet {card.get('name', '')}",
        })
    return rows


def data_docs_index(layout: ArtifactLayout) -> Path | None:
    """The Great Expectations Data Docs of the validate stage (data.validate's file-backed project), if built."""
    return layout.data_docs_index if layout.data_docs_index.is_file() else None


def _validation(layout: ArtifactLayout, publish_dir: Path) -> dict:
    """Per dataset: its validation verdict (<validation>/<name>.json); the Data Docs link, relative to the
    folder the page is published from."""
    rows = []
    for path in layout.validation_reports():
        try:
            report = json.loads(path.read_text())
            stats = report.get("statistics") or {}
            rows.append({
                "name": report.get("dataset", path.stem), "success": bool(report.get("success")), "rows": report.get("rows", "-"),
                "expectations": (f"{stats['successful_expectations']} of {stats['evaluated_expectations']}"
                                 if "evaluated_expectations" in stats else "-"),
                "quarantined": (report.get("quarantine") or {}).get("rows", 0),
                "summary": (report.get("summary") or "").splitlines()[0] if report.get("summary") else "",
            })
        except (OSError, ValueError, AttributeError, KeyError) as e:
            rows.append({"name": path.stem, "success": False, "rows": "-", "expectations": "-", "quarantined": "-",
                         "summary": f"{path.name} is unreadable ({e})"})
    index = data_docs_index(layout)
    href = Path(os.path.relpath(index.resolve(), publish_dir.resolve())).as_posix() if index is not None else None
    return {"rows": rows, "data_docs": href}


def _table3(ckpts: Sequence[Checkpoint]) -> dict:
    keys = [k for _, k in TABLE3_COLUMNS]
    best = {}
    for k in keys:
        vals = [c.metrics[k] for c in ckpts if k in c.metrics]
        best[k] = max(vals) if vals else None
    rows = []
    for c in ckpts:
        cells = None
        if any(k in c.metrics for k in keys):
            cells = [{"cls": "missing", "text": "not run"} if k not in c.metrics else
                     {"cls": "best" if c.metrics[k] == best[k] and len(ckpts) > 1 else None, "text": _fmt(c.metrics[k])}
                     for k in keys]
        rows.append({"label": c.label, "aliases": c.aliases, "cells": cells})
    paper = [{"name": name, "values": [f"{v:.2f}" for v in values]} for name, values in PAPER_ROWS.items()]
    return {"labels": [label for label, _ in TABLE3_COLUMNS], "rows": rows, "paper": paper}


def _leaderboard(ckpts: Sequence[Checkpoint], columns: Sequence[tuple[str, str]]) -> dict:
    """Our checkpoints' rows of a benchmark table: one cell per (label, metric) column, best of each bolded."""
    keys = [k for _, k in columns]
    best = {k: max((c.metrics[k] for c in ckpts if k in c.metrics), default=None) for k in keys}
    rows = []
    for c in ckpts:
        cells = None
        if any(k in c.metrics for k in keys):
            cells = [{"cls": "missing", "text": "not run"} if k not in c.metrics else
                     {"cls": "best" if c.metrics[k] == best[k] and len(ckpts) > 1 else None, "text": _fmt(c.metrics[k])}
                     for k in keys]
        rows.append({"label": c.label, "aliases": c.aliases, "cells": cells})
    return {"labels": [label for label, _ in columns], "rows": rows}


def _heldout_tables(ckpts: Sequence[Checkpoint]) -> dict:
    """MICo-Bench (Table 2 layout, the paper's rows beside ours) and MIGE-Bench (ours; MIGE Table 3's rows in their
    own feature-metric columns): the papers' numbers from evaluation.paper_results, the one place they live."""
    from evaluation.paper_results import MICO_TABLE2, MIGE_TABLE3, MIGE_TABLE3_COLUMNS

    mico = _leaderboard(ckpts, MICO_COLUMNS)
    extra = len(MICO_COLUMNS) - len(next(iter(MICO_TABLE2.values())))
    mico["paper"] = [{"name": f"{name} (paper)", "values": [f"{v:.1f}" for v in values] + ["-"] * extra}
                     for name, values in MICO_TABLE2.items()]
    mige = _leaderboard(ckpts, MIGE_COLUMNS)
    mige["paper_labels"] = [f"{edit.capitalize()} {c}" for edit in ("replacement", "addition") for c in MIGE_TABLE3_COLUMNS]
    mige["paper"] = []  # other figures: MIGE Table 3's rows go in a table of their own
    mige["paper_table"] = [{"name": f"{name} (paper)",
                      "values": ["-" if v is None else f"{v:.3f}" for v in (*rows["replacement"], *rows["addition"])]}
                     for name, rows in MIGE_TABLE3.items()]
    return {"mico": mico, "mige": mige}


def _gate(ckpts: Sequence[Checkpoint]) -> list[dict]:
    rows = []
    for c in ckpts:
        decision = c.tags.get(TAG_DECISION)
        reasons = []
        if decision is not None:
            try:
                reasons = json.loads(c.tags.get(TAG_REASONS, "[]"))
            except json.JSONDecodeError:
                reasons = [c.tags.get(TAG_REASONS, "")]
        rows.append({"label": c.label, "decision": decision, "champion_before": c.tags.get(TAG_CHAMPION_BEFORE, "none"),
                     "reasons": [{"cls": "fail" if str(r).startswith("fail") else "pass", "text": r} for r in reasons]})
    return rows


def _prefix_table(ckpts: Sequence[Checkpoint], prefix: str, table_id: str, what: str, heading: str) -> dict:
    keys = sorted({k for c in ckpts for k in c.metrics if k.startswith(prefix)})
    rows = [{"label": c.label, "cells": [None if k not in c.metrics else f"{c.metrics[k]:.4g}" for k in keys]}
            for c in ckpts if any(k in c.metrics for k in keys)]
    return {"id": table_id, "heading": heading, "what": what, "prefix": prefix, "keys": [k[len(prefix):] for k in keys], "rows": rows}


def _srum_ablation(layout: ArtifactLayout, out_dir: Path) -> dict:
    """`scone bench srum-ablation` when it has been run: a plot per prompt set and the judge agreement."""
    from dashboards.plots import plot_ablation

    path = layout.bench_result("srum-ablation")
    if not path.exists():
        return {"state": "missing"}
    try:
        result = json.loads(path.read_text())
        variants = result["variants"]
        images = []
        for prompt_set in ("train_prompts", "heldout_prompts"):
            panels = {m: [(v["scores"][prompt_set][m]["mean"], v["scores"][prompt_set][m]["std"]) for v in variants.values()]
                      for m in ("mean", "found")}
            start = result["init"]["scores"][prompt_set]
            png = plot_ablation([v["label"] for v in variants.values()],
                                {"T2I accuracy (mean of categories)": panels["mean"], "subjects found": panels["found"]},
                                out_dir / f"srum_ablation_{prompt_set}.png", f"SRUM ablation, {prompt_set.replace('_', ' ')}",
                                {"T2I accuracy (mean of categories)": start["mean"], "subjects found": start["found"]})
            images.append({"src": png.name, "alt": f"SRUM ablation {prompt_set}"})

        def num(v):
            return "n/a" if v is None else f"{v:.2f}"

        agreement = [{"seed": seed, "values": [num(a["global"]["pearson"]), num(a["global"]["sign_agreement"]),
                                                 num(a["regions"]["pearson"]), num(a["regions"]["sign_agreement"])]}
                     for seed, a in result.get("self_vs_oracle_judge", {}).items()]
        return {"state": "ok", "judge": result["judge"], "seeds": result["seeds"],
                "per_prompt": result["eval_samples_per_prompt"], "images": images, "agreement": agreement}
    except (KeyError, TypeError, ValueError) as e:
        return {"state": "error", "path": str(path), "error": str(e)}


def build_report(artifacts: Path | ArtifactLayout, tracking_uri: str, model_name: str, out: Path | None = None,
                 publish_dir: Path | None = None) -> Path:
    """Write the report (default `<artifacts>/reports/index.html`) and its images; return the HTML path.

    `artifacts` is the artifact map the steps wrote by (tasks pass theirs, tasks.paths.Paths) or its root folder,
    the data root then at its default place under it (data.layout.ArtifactLayout.at). A relative SQLite
    `tracking_uri` is resolved against the parent of the artifacts root (the repository root), as the tracker does;
    `MLFLOW_TRACKING_URI` overrides it. `publish_dir` is the folder the page is served from, which links outside
    the report folder (the Data Docs) are relative to: by default `<artifacts>/reports`, where tasks.report swaps
    the folder it builds in staging.
    """
    from dashboards.diagnostics import diagnostics_section
    from dashboards.plots import plot_curves, plot_overall

    layout = artifacts if isinstance(artifacts, ArtifactLayout) else ArtifactLayout.at(artifacts)
    out = Path(out) if out is not None else layout.report_page
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    publish_dir = Path(publish_dir) if publish_dir is not None else layout.reports

    client, store_note = _open_client(tracking_uri, layout.root.resolve().parent)
    ckpts = collect_checkpoints(client, model_name) if client is not None else []

    # stages trained but never registered still get their curves
    seen = {c.name for c in ckpts}
    on_disk = layout.trained()
    unregistered = [Checkpoint(name=n, kind="srum" if n.startswith("srum") else "stage") for n in on_disk if n not in seen]

    overall = None
    if any(SCONEEVAL_OVERALL in c.metrics for c in ckpts):
        refs = {name: values[-1] for name, values in PAPER_ROWS.items()}
        overall = plot_overall([c.label for c in ckpts], [c.metrics.get(SCONEEVAL_OVERALL) for c in ckpts], refs,
                               out_dir / "sconeeval_overall.png").name

    curves = []
    for c in ckpts + unregistered:
        series, source = loss_series(client, c, layout)
        png = plot_curves(series, f"{c.label} ({c.kind})", out_dir / f"loss_{c.slug}.png").name if any(series.values()) else None
        curves.append({"label": c.label, "png": png, "source": source})

    samples = []
    for c in ckpts:
        summary = _summary_path(c, layout)
        paths = sample_paths(summary) if summary is not None else []
        images = [{"src": f"samples/{_thumbnail(p, out_dir / 'samples' / f'{c.slug}_{i}.png').name}", "alt": p.name}
                  for i, p in enumerate(paths)]
        samples.append({"label": c.label, "images": images})

    page = render(
        "report.html.j2",
        title=f"scone-ops report: {model_name}", model_name=model_name,
        champion=next((c.label for c in ckpts if CHAMPION_ALIAS in c.aliases), "none"), n_versions=len(ckpts),
        store_note=store_note, generated=dt.datetime.now().isoformat(timespec="seconds"),
        table3=_table3(ckpts), heldout=_heldout_tables(ckpts), overall=overall, gate=_gate(ckpts), curves=curves,
        prefix_tables=[_prefix_table(ckpts, SRUM_PREFIX, "srum", "SRUM", "SRUM rewards"),
                       _prefix_table(ckpts, T2I_PREFIX, "t2i", "compositional T2I", "Compositional T2I"),
                       _prefix_table(ckpts, UNDERSTANDING_PREFIX, "understanding", "held-out understanding",
                                     "Understanding (held-out accuracy per question type)")],
        ablation=_srum_ablation(layout, out_dir), samples=samples,
        diagnostics=diagnostics_section(ckpts, layout, out_dir),
        validation=_validation(layout, publish_dir), datacards=_datacards(layout, out_dir),
    )
    out.write_text(page)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dashboards.report", description="build the HTML report")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--data", default=None, help="the data root (params data.root); default: <artifacts>/data")
    ap.add_argument("--tracking-uri", default="sqlite:///artifacts/mlflow.db")
    ap.add_argument("--model", default="scone-tiny")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else None
    layout = ArtifactLayout.at(args.artifacts, args.data)
    print(build_report(layout, args.tracking_uri, args.model, out, out.parent if out else None))


if __name__ == "__main__":
    main()
