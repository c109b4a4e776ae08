"""Row-level quarantine: unusable rows leave the dataset for `<root>/quarantine/<name>.parquet` with a reason.

Built and imported Scone-S2I rows pass the same checks (an undecodable or mis-sized image, a wrong image
count, an empty instruction, a subject label with no subject phrase beside it, a duplicate key); the valid
rows continue, and a run fails when the quarantined share exceeds `data.quality.max_quarantine_fraction`.
Validation (data.validate) quarantines with the same checks into `<root>/../validation/quarantine/`, and the
trainer's loader (model.data_loader) skips the rows listed there.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data.catalog import ALL_DATASETS
from data.config import DataConfig
from data.layout import validation_dir

REASON = "reason"
MAX_EXAMPLES = 5


class DataQualityError(RuntimeError):
    """Too many rows of a dataset were quarantined."""


def quarantine_path(cfg: DataConfig, name: str) -> Path:
    return Path(cfg.root) / "quarantine" / f"{name}.parquet"


def validation_quarantine_path(root: str | Path, name: str) -> Path:
    """Rows validation took out of data root `root`: inside the validate stage's DVC output (<root>/../validation)."""
    return validation_dir(root) / "quarantine" / f"{name}.parquet"


def fix_hint(name: str, *, row: bool = True, kind: str = "scone-s2i") -> str:
    """What to do about a bad row (row=True) or a bad file of dataset `name`: ours are rebuilt, imports re-imported."""
    if name in ALL_DATASETS:
        return f"rebuild it with `scone data build {name}`"
    what = "fix or drop the row in the source" if row else "fix the source files"
    return f"{what} and re-import it (`scone data import --kind {kind} SRC --name {name}`)"


def _image_problem(data, image_size: int | None) -> str:
    if not isinstance(data, (bytes, bytearray)):
        return f"is {type(data).__name__}, not encoded image bytes"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size, mode = img.size, img.mode
    except Exception as e:  # the decoder's failure is the finding
        return f"does not decode ({type(e).__name__})"
    if image_size is not None and size != (image_size, image_size):
        return f"is {size[0]}x{size[1]}, expected {image_size}x{image_size}"
    if image_size is not None and mode != "RGB":  # strict (our own) data is RGB, as the validation suite expects
        return f"is {mode}, expected RGB"
    return ""


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def row_key(row: dict) -> str:
    """The row's `key`, or (foreign data without one) a digest of its images and instruction."""
    if row.get("key") not in (None, ""):
        return str(row["key"])
    h = hashlib.sha256(str(row.get("instruction")).encode())
    for img in row.get("image") or ():
        h.update(img if isinstance(img, (bytes, bytearray)) else repr(img).encode())
    return "sha256:" + h.hexdigest()[:16]


def row_problems(row: dict, *, min_images: int, max_images: int, image_size: int | None = None) -> list[str]:
    """Problems of one Scone-S2I row (empty = usable). `image_size` None accepts any size (foreign data)."""
    problems = []
    images = row.get("image")
    if not isinstance(images, (list, tuple)):
        problems.append("no image list")
    else:
        if not min_images <= len(images) <= max_images:
            problems.append(f"{len(images)} images, expected {min_images}..{max_images} (references + target)")
        problems += [f"image {i + 1} {p}" for i, data in enumerate(images) if (p := _image_problem(data, image_size))]
    text = row.get("instruction")
    if not isinstance(text, str) or not text.strip():
        problems.append("empty instruction")
    if "subject_label" in row and row["subject_label"] is not None:
        try:
            labels = _json(row["subject_label"])
            phrases = _json(row.get("subject_list")) or []
        except (TypeError, ValueError):
            problems.append("subject_list / subject_label are not JSON")
        else:
            for i, lab in enumerate(labels or []):
                named = phrases[i] if i < len(phrases) and isinstance(phrases[i], list) else []
                if any(lab) and len(named) < len(lab):
                    problems.append(f"reference {i + 1}: subject label without a subject phrase ({len(lab)} labels, {len(named)} phrases)")
    return problems


@dataclass
class RowFilter:
    """Streams rows, passing usable ones through and keeping the rest (with their reason) for the quarantine file."""

    min_images: int
    max_images: int
    image_size: int | None = None
    extra: Callable[[dict], list[str]] | None = None  # further row checks (validation adds its label rules)
    seen: set = field(default_factory=set)
    bad: list = field(default_factory=list)
    total: int = 0

    @classmethod
    def for_config(cls, cfg: DataConfig, *, strict_size: bool = True, min_images: int = 2,
                   extra: Callable[[dict], list[str]] | None = None) -> "RowFilter":
        return cls(min_images, cfg.max_references + 1, cfg.image_size if strict_size else None, extra)

    def __call__(self, rows: Iterable[dict]) -> Iterator[dict]:
        for row in rows:
            self.total += 1
            problems = row_problems(row, min_images=self.min_images, max_images=self.max_images, image_size=self.image_size)
            if self.extra is not None:
                problems += [p for p in self.extra(row) if p not in problems]
            key = row_key(row)
            if key in self.seen:
                problems.append(f"duplicate key {key}")
            self.seen.add(key)
            if problems:
                self.bad.append((row, "; ".join(problems)))
            else:
                yield row


def write_quarantine(bad: list[tuple[dict, str]], cfg: DataConfig, name: str, path: Path | None = None) -> Path | None:
    """Write (row, reason) pairs as parquet (to `path`, default `quarantine_path`); a clean run removes an old
    file. Returns the path written."""
    path = Path(path) if path is not None else quarantine_path(cfg, name)
    if not bad:
        if path.exists():
            path.unlink()
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    # rows of one dataset share columns, but broken ones may carry odd values: store non-binary fields as JSON text
    columns = sorted({c for row, _ in bad for c in row} - {REASON})
    records = []
    for row, reason in bad:
        rec = {}
        for c in columns:
            v = row.get(c)
            if c == "image":
                rec[c] = [x if isinstance(x, (bytes, bytearray)) else repr(x).encode() for x in v] if isinstance(v, (list, tuple)) else None
            else:
                rec[c] = v if isinstance(v, str) or v is None else json.dumps(v, default=str)
        rec[REASON] = reason
        records.append(rec)
    schema = pa.schema([("image", pa.list_(pa.binary())) if c == "image" else (c, pa.string()) for c in columns] + [(REASON, pa.string())])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path


def read_quarantine(cfg: DataConfig, name: str) -> list[dict]:
    path = quarantine_path(cfg, name)
    return pq.read_table(path).to_pylist() if path.exists() else []


def enforce_threshold(n_bad: int, n_total: int, cfg: DataConfig, name: str, examples: list[tuple[str, str]]) -> None:
    """Raise DataQualityError when more than max_quarantine_fraction of the rows were quarantined."""
    fraction = n_bad / max(n_total, 1)
    if fraction > cfg.quality.max_quarantine_fraction:
        lines = "\n".join(f"  {k}: {r}" for k, r in examples[:MAX_EXAMPLES])
        raise DataQualityError(
            f"dataset {name}: {n_bad} of {n_total} rows quarantined ({fraction:.1%} > "
            f"data.quality.max_quarantine_fraction={cfg.quality.max_quarantine_fraction}); "
            f"see {quarantine_path(cfg, name)}\n{lines}"
        )
