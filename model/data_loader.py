"""Deterministic, resumable, rank-sharded sample order over Scone-S2I parquet datasets.

The sample stream of a stage is the concatenation of its datasets, visited epoch after epoch, each epoch
a permutation drawn from (seed, epoch). Optimizer step s consumes stream positions
[s * G, (s + 1) * G) with G = micro_batch * grad_accum * world_size; that window is cut into G / micro_batch
chunks and chunk c = micro_step * world_size + rank goes to `rank` at `micro_step`. So the position in the
stream is the whole data-loader state a resumed run needs, and one rank with grad_accum k sees exactly the
chunks that k ranks see in one micro step.

Rows are read once per process and turned into examples (decoded images) by the model's batching code;
the datasets are small, so the decoded examples stay cached in memory for later stages of the same process.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.parquet as pq

from data.formats import scone_s2i

# Scone-S2I-57K has image + instruction; our datasets add metadata (qa feeds the understanding loss).
REQUIRED_COLUMNS = ("image", "instruction")
OPTIONAL_COLUMNS = ("key", "qa")

_EXAMPLE_CACHE: dict[tuple, list] = {}


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


def read_rows(root: str | Path, name: str) -> list[dict]:
    """All rows of a dataset as dicts (image: list of encoded bytes, last = target; instruction; qa...)."""
    rows: list[dict] = []
    for path in dataset_files(root, name):
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; a Scone-S2I shard needs {list(REQUIRED_COLUMNS)}")
        cols = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]
        rows.extend(pq.read_table(path, columns=cols).to_pylist())
    return rows


def _fingerprint(root: str | Path, name: str) -> tuple:
    # a rebuilt dataset (new files or new contents) must not be served from the cache
    return tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in dataset_files(root, name))


def load_examples(root: str | Path, names: Sequence[str], examples_from_rows: Callable[[list[dict]], list]) -> list:
    """Examples of the datasets `names`, concatenated in that order; decoded once per process."""
    out: list = []
    for name in names:
        key = (_fingerprint(root, name), getattr(examples_from_rows, "__module__", ""),
               getattr(examples_from_rows, "__qualname__", repr(examples_from_rows)))
        if key not in _EXAMPLE_CACHE:
            examples = list(examples_from_rows(read_rows(root, name)))
            if not examples:
                raise ValueError(f"dataset {name!r} under {root} has no rows")
            _EXAMPLE_CACHE[key] = examples
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
