"""Register a downloaded dataset under `data.root`: copy it into our layout, quarantine bad rows, validate.

kind "scone-s2i": the released Scone-S2I-57K layout, `parquet_info/<name>.json` listing parquet files (the
    released info files name them by absolute paths of the machine that wrote them) and
    `parquet_data/<name>/*.parquet` with at least `image` (list of encoded images, target last) and
    `instruction`. Each info file becomes the dataset `<name>`, rewritten with keys relative to data.root.
kind "sconeeval": a SconeEval directory (`data.jsonl` + the images it names, optional `ground_truth.jsonl`),
    copied to `<data.root>/<name>/`.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from data.config import DataConfig
from data.formats import scone_s2i
from data.formats.jsonl import iter_jsonl, read_jsonl
from data.quarantine import RowFilter, _image_problem, enforce_threshold, row_key, write_quarantine
from data.validate import validate_dataset

KINDS = ("scone-s2i", "sconeeval")
DEFAULT_BENCH_NAME = "sconeeval"


def import_dataset(kind: str, src: Path, cfg: DataConfig, name: str | None = None) -> dict:
    """Import `src` as dataset(s) under cfg.root; returns {"kind", "source", "datasets": {name: summary}}.

    scone-s2i: `name` picks one parquet_info/<name>.json of src (None: every one). sconeeval: the dataset
    name under cfg.root (None: "sconeeval"). Raises data.quarantine.DataQualityError when more than
    quality.max_quarantine_fraction of a dataset's rows are quarantined and
    data.validate.DataValidationError when the imported rows fail their suite.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"import source {src} is not a directory")
    if kind == "scone-s2i":
        names = _s2i_names(src, name)
        datasets = {n: _import_s2i(src, n, cfg) for n in names}
    elif kind == "sconeeval":
        n = name or DEFAULT_BENCH_NAME
        datasets = {n: _import_bench(src, n, cfg)}
    else:
        raise ValueError(f"unknown import kind {kind!r}; expected one of {KINDS}")
    return {"kind": kind, "source": str(src), "datasets": datasets}


# ------------------------------------------------------------------ Scone-S2I


def _s2i_names(src: Path, name: str | None) -> list[str]:
    infos = sorted(p.stem for p in (src / "parquet_info").glob("*.json"))
    if not infos:
        raise FileNotFoundError(f"{src}/parquet_info/*.json not found: not a Scone-S2I-57K layout directory")
    if name is None:
        return infos
    if name not in infos:
        raise FileNotFoundError(f"{src}/parquet_info/{name}.json not found; this directory has {infos}")
    return [name]


def source_file(src: Path, name: str, key: str) -> Path:
    """The file an info key names, looked up inside `src`: the key's part from `parquet_data/` on, the key
    relative to src, then `parquet_data/<name>/<file name>`. Absolute paths of another machine resolve here."""
    k = Path(key)
    tried = []
    if "parquet_data" in k.parts:
        tried.append(src.joinpath(*k.parts[k.parts.index("parquet_data"):]))
    if not k.is_absolute():
        tried.append(src / k)
    tried.append(src / "parquet_data" / name / k.name)
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(f"parquet_info/{name}.json lists {key}; looked for it at {[str(p) for p in tried]}")


def _import_s2i(src: Path, name: str, cfg: DataConfig) -> dict:
    started = time.perf_counter()
    info = json.loads((src / "parquet_info" / f"{name}.json").read_text())
    files = [source_file(src, name, key) for key in sorted(info)]
    if not files:
        raise ValueError(f"{src}/parquet_info/{name}.json lists no files")
    schema = pq.read_schema(files[0])
    for f in files[1:]:
        if not pq.read_schema(f).equals(schema):
            raise ValueError(f"{f} has another schema than {files[0]}; a dataset's shards must share one")
    missing = [c for c in ("image", "instruction") if c not in schema.names]
    if missing:
        raise ValueError(f"{files[0]}: missing columns {missing}; Scone-S2I rows need `image` and `instruction`")
    keep = RowFilter.for_config(cfg, strict_size=False)
    counts: Counter = Counter()

    def rows():
        for f in files:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                for row in keep(pf.read_row_group(g).to_pylist()):
                    counts[row.get("task_type") or "unknown"] += 1
                    yield row

    written = scone_s2i.write_rows(rows(), cfg.root, name, cfg.rows_per_row_group, cfg.rows_per_row_group * cfg.row_groups_per_file, schema)
    qpath = write_quarantine(keep.bad, cfg, name)
    enforce_threshold(len(keep.bad), keep.total, cfg, name, [(row_key(r), why) for r, why in keep.bad])
    report = validate_dataset(name, cfg)
    return {
        "name": name,
        "rows": keep.total - len(keep.bad),
        "quarantined": len(keep.bad),
        "task_type": dict(sorted(counts.items())),
        "files": [str(p) for p in written],
        "quarantine_file": str(qpath) if qpath else None,
        "validation": {"success": report["success"], "summary": report["summary"], "report_path": report["report_path"]},
        "seconds": round(time.perf_counter() - started, 3),
    }


# ------------------------------------------------------------------ SconeEval


def _bench_problems(row: dict, src: Path, cfg: DataConfig, seen: set) -> list[str]:
    problems = []
    images = row.get("input_images")
    if not isinstance(images, list):
        problems.append("no input_images list")
        images = []
    elif not 1 <= len(images) <= cfg.max_references:
        problems.append(f"{len(images)} input images, expected 1..{cfg.max_references}")
    for i, rel in enumerate(images, start=1):
        path = src / rel
        if not path.is_file():
            problems.append(f"image {i} {rel} is missing")
        elif p := _image_problem(path.read_bytes(), None):
            problems.append(f"image {i} {p}")
    if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
        problems.append("empty instruction")
    labels, phrases = row.get("subject_label") or [], row.get("subject_list") or []
    for i, lab in enumerate(labels):
        named = phrases[i] if i < len(phrases) else []
        if any(lab) and len(named) < len(lab):
            problems.append(f"reference {i + 1}: subject label without a subject phrase")
    key = str(row.get("key"))
    if key in seen:
        problems.append(f"duplicate key {key}")
    seen.add(key)
    return problems


def _import_bench(src: Path, name: str, cfg: DataConfig) -> dict:
    started = time.perf_counter()
    data = src / "data.jsonl"
    if not data.is_file():
        raise FileNotFoundError(f"{data} not found: not a SconeEval layout directory")
    out = Path(cfg.root) / name
    if out.resolve() == src.resolve():
        raise ValueError(f"import source {src} is the destination itself")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    good, bad, seen = [], [], set()

    def not_json(n: int, line: str, why: str) -> None:
        bad.append(({"key": f"line {n}", "instruction": line[:200]}, f"not JSON ({why})"))

    for _, row in iter_jsonl(data, on_bad_line=not_json):  # in line order, bad lines among the rows
        problems = _bench_problems(row, src, cfg, seen)
        if problems:
            bad.append((row, "; ".join(problems)))
            continue
        for rel in row["input_images"]:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, out / rel)
        good.append(row)
    (out / "data.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in good))
    truth = src / "ground_truth.jsonl"
    if truth.is_file():
        kept = {r["key"] for r in good}
        rows = [r for r in read_jsonl(truth) if r.get("key") in kept]
        (out / "ground_truth.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    qpath = write_quarantine(bad, cfg, name)
    enforce_threshold(len(bad), len(good) + len(bad), cfg, name, [(str(r.get("key")), why) for r, why in bad])
    report = validate_dataset(name, cfg)
    return {
        "name": name,
        "rows": len(good),
        "quarantined": len(bad),
        "task_type": dict(sorted(Counter(r.get("task_type", "unknown") for r in good).items())),
        "files": [str(out / "data.jsonl")],
        "quarantine_file": str(qpath) if qpath else None,
        "validation": {"success": report["success"], "summary": report["summary"], "report_path": report["report_path"]},
        "seconds": round(time.perf_counter() - started, 3),
    }
