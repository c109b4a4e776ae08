"""Deterministic, resumable, rank-sharded sample order over Scone-S2I parquet datasets.

The sample stream of a stage is the concatenation of its datasets, visited epoch after epoch, each epoch
a permutation drawn from (seed, epoch). Optimizer step s consumes stream positions
[s * G, (s + 1) * G) with G = micro_batch * grad_accum * world_size; that window is cut into G / micro_batch
chunks and chunk c = micro_step * world_size + rank goes to `rank` at `micro_step`. So the position in the
stream is the whole data-loader state a resumed run needs, and one rank with grad_accum k sees exactly the
chunks that k ranks see in one micro step.

Rows are read once per process and turned into examples (decoded images) by the model's batching code;
the datasets are small, so the decoded examples stay cached in memory for later stages of the same process.

Only clean rows are trained on: rows validation quarantined (validation/quarantine/<name>.parquet next to
the data root) are skipped, and a row that still fails to decode here is quarantined too, as long as the
share of the dataset lost stays within max_quarantine_fraction; past it, DataDecodeError names the dataset,
the shard file, the row and its key, and the fix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.parquet as pq

from data.formats import scone_s2i
from data.quarantine import fix_hint, row_key, row_problems, validation_quarantine_path, write_quarantine

# Scone-S2I-57K has image + instruction; our datasets add metadata (qa feeds the understanding loss).
REQUIRED_COLUMNS = ("image", "instruction")
OPTIONAL_COLUMNS = ("key", "qa")

_EXAMPLE_CACHE: dict[tuple, list] = {}
log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """A stage names a dataset with no parquet shards under data_root."""


def dataset_files(root: str | Path, name: str) -> list[Path]:
    """The shards parquet_info/<name>.json lists (the Scone-S2I index; released absolute paths resolve too)."""
    fix = f"build it first: `scone data build {name}` or `dvc repro`, or fix data.root / the stage's datasets"
    try:
        files = scone_s2i.parquet_files(root, name)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"dataset {name!r}: {e} ({fix})") from None
    if not files:
        raise DatasetNotFoundError(f"dataset {name!r}: parquet_info lists no shards under {root} ({fix})")
    return files


class DataDecodeError(ValueError):
    """More rows of a dataset fail to decode than data.quality.max_quarantine_fraction allows."""


def _shard_rows(root: str | Path, name: str):
    """(shard name, index in the shard, row) for every row of a dataset, shard by shard."""
    for path in dataset_files(root, name):
        shard = scone_s2i.shard_name(root, path)
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"dataset {name}, {shard}: missing column(s) {missing}; a Scone-S2I shard needs "
                             f"{list(REQUIRED_COLUMNS)}; {fix_hint(name, row=False)}")
        cols = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]
        for index, row in enumerate(pq.read_table(path, columns=cols).to_pylist()):
            yield shard, index, row


def read_rows(root: str | Path, name: str) -> list[dict]:
    """All rows of a dataset as dicts (image: list of encoded bytes, last = target; instruction; qa...)."""
    return [row for _, _, row in _shard_rows(root, name)]


def quarantined_rows(root: str | Path, name: str) -> set[tuple]:
    """(shard, row index, key) of the rows validation quarantined. By position as well as key, so that of two
    rows sharing a key only the quarantined (second) one is left out; (None, None, key) where unknown."""
    path = validation_quarantine_path(root, name)
    if not path.exists():
        return set()
    table = pq.read_table(path)
    cols = table.column_names
    out = set()
    for rec in table.select([c for c in (scone_s2i.SHARD_COLUMN, scone_s2i.ROW_COLUMN, "key") if c in cols]).to_pylist():
        row = rec.get(scone_s2i.ROW_COLUMN)
        out.add((rec.get(scone_s2i.SHARD_COLUMN), int(row) if row is not None else None, rec.get("key")))
    return out


def _fingerprint(root: str | Path, name: str) -> tuple:
    # a rebuilt dataset (new files or new contents) or a new quarantine list must not be served from the cache
    files = [*dataset_files(root, name), validation_quarantine_path(root, name)]
    return tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.exists())


def _where(name: str, shard: str, index: int, key: str) -> str:
    return f"dataset {name}, {shard}, row {index} (key {key})"


def _decode_problem(row: dict, error: Exception) -> str:
    """Why a row does not decode: the row checks say which image when they can, else the error itself."""
    problems = row_problems(row, min_images=1, max_images=len(row.get("image") or ()) or 1)
    return "; ".join(problems) if problems else f"{type(error).__name__}: {error}"


def _decode_rows(rows: list[dict], sources: list[tuple], examples_from_rows) -> tuple[list, list]:
    """Examples, and (row, source, reason) of the rows that fail. Decodes all rows at once (the usual case);
    only when that fails, row by row to find the culprits."""
    try:
        return list(examples_from_rows(rows)), []
    except Exception:  # noqa: BLE001 (any failure of the model's decoding is a finding about some row)
        pass
    examples, bad = [], []
    for row, source in zip(rows, sources):
        try:
            examples.extend(examples_from_rows([row]))
        except Exception as e:  # noqa: BLE001
            bad.append((row, source, _decode_problem(row, e)))
    return examples, bad


def _load_dataset(root, name: str, examples_from_rows, max_fraction: float, quarantine_dir) -> list:
    skip = quarantined_rows(root, name)
    rows, sources, skipped = [], [], 0
    for shard, index, row in _shard_rows(root, name):
        key = row_key(row)
        if (shard, index, key) in skip or (None, None, key) in skip:
            skipped += 1
            continue
        rows.append(row)
        sources.append((shard, index, key))
    examples, bad = _decode_rows(rows, sources, examples_from_rows)
    total, lost = len(rows) + skipped, skipped + len(bad)
    findings = [f"{_where(name, *source)}: {reason}" for _, source, reason in bad]
    if bad and lost / max(total, 1) > max_fraction:
        more = "".join(f"\n  {f}" for f in findings[1:6])
        raise DataDecodeError(
            f"{findings[0]}; {fix_hint(name)}\n  {lost} of {total} rows unusable ({lost / total:.1%} > "
            f"data.quality.max_quarantine_fraction={max_fraction:g}: {skipped} quarantined by validation, "
            f"{len(bad)} failing to decode now){more}")
    if bad:
        log.warning("dataset %s: %d row(s) fail to decode and are left out (%d of %d rows unusable, within "
                    "data.quality.max_quarantine_fraction=%g):\n  %s", name, len(bad), lost, total, max_fraction,
                    "\n  ".join(findings))
        if quarantine_dir is not None:
            records = [({**row, scone_s2i.SHARD_COLUMN: shard, scone_s2i.ROW_COLUMN: index, "key": key}, reason)
                       for row, (shard, index, key), reason in bad]
            write_quarantine(records, None, name, path=Path(quarantine_dir) / f"{name}.parquet")
    if not examples:
        raise ValueError(f"dataset {name!r} under {root} has no rows" + (f" ({skipped} quarantined by validation)" if skipped else ""))
    return examples


def load_examples(root: str | Path, names: Sequence[str], examples_from_rows: Callable[[list[dict]], list], *,
                  max_quarantine_fraction: float = 0.05, quarantine_dir: str | Path | None = None) -> list:
    """Examples of the clean rows of datasets `names`, concatenated in that order; decoded once per process.

    Rows that fail to decode are left out (and written to `quarantine_dir`/<name>.parquet when given; the
    default writes nothing, since every rank runs this and one of them should) unless, with the rows
    validation quarantined, more than `max_quarantine_fraction` of the dataset is lost: DataDecodeError."""
    out: list = []
    for name in names:
        key = (_fingerprint(root, name), getattr(examples_from_rows, "__module__", ""),
               getattr(examples_from_rows, "__qualname__", repr(examples_from_rows)), max_quarantine_fraction)
        if key not in _EXAMPLE_CACHE:
            _EXAMPLE_CACHE[key] = _load_dataset(root, name, examples_from_rows, max_quarantine_fraction, quarantine_dir)
        out.extend(_EXAMPLE_CACHE[key])
    return out


def clear_cache() -> None:
    _EXAMPLE_CACHE.clear()


class SampleOrder:
    """The endless stream of sample indices: epoch e is a permutation of range(n) drawn from (seed, e)."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("SampleOrder needs at least one sample")
        self.num_samples = num_samples
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 4:  # a step window spans at most a few epochs
                self._permutations.clear()
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._permutations[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at stream positions [start, start + count)."""
        positions = np.arange(start, start + count)
        epochs, offsets = np.divmod(positions, self.num_samples)
        return np.array([self.permutation(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)


@dataclass(frozen=True)
class Sharding:
    micro_batch: int
    grad_accum: int
    world_size: int
    rank: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def chunk(self, micro_step: int) -> int:
        """Index of this rank's micro batch inside the global batch at `micro_step`."""
        return micro_step * self.world_size + self.rank

    def window(self, position: int, micro_step: int) -> tuple[int, int]:
        """Stream positions (start, count) of this rank's micro batch of the step that starts at `position`."""
        return position + self.chunk(micro_step) * self.micro_batch, self.micro_batch


class StageBatches:
    """Micro batches of one rank, addressed by stream position: nothing to save but the position."""

    def __init__(self, examples: list, collate: Callable[[list], Any], *, seed: int, sharding: Sharding):
        self.examples = examples
        self.collate = collate
        self.order = SampleOrder(len(examples), seed)
        self.sharding = sharding

    def micro_batch_indices(self, position: int, micro_step: int) -> np.ndarray:
        return self.order.indices(*self.sharding.window(position, micro_step))

    def micro_batch(self, position: int, micro_step: int):
        return self.collate([self.examples[i] for i in self.micro_batch_indices(position, micro_step)])
