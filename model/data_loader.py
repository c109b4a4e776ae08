"""Streamed, deterministic, resumable micro batches over Scone-S2I parquet datasets, each rank reading its own rows.

Lanes. A step of training runs L = world_size * grad_accum micro batches; lane c feeds the micro batch
`micro_step * world_size + rank == c` of every step (`Sharding.chunk`), so rank r runs the lanes
r, r + world_size, ... and every rank runs exactly grad_accum micro batches per step, packed or not: the ZeRO-3
collectives of the forward and backward passes line up across ranks. Which samples a lane serves depends on L
and the seed only, so one rank with grad_accum k trains on the same micro batches, in the same slots (and with the
same noise, train.noise_seed), as k ranks with grad_accum 1.

What a lane reads. The stage's datasets are cut into units, the parquet row groups (in the degenerate case of
fewer row groups than lanes, row slices of them, so every lane has rows). Each epoch e draws a permutation of the
units from (seed, e) and deals them out in that order, each to the lane holding the fewest rows so far: the
lanes' shares of an epoch are disjoint and together hold every row once. A lane visits its share in blocks of
`window` units (train.shuffle_window); the rows of a block are shuffled together by (seed, e, lane, block). The
lane then goes on to its share of epoch e + 1: lanes do not wait for each other, so their epochs may drift apart
by a share's length. A rank thus reads only the row groups of its lanes, a row group at a time (one parquet read
per unit), and no process ever holds more than a few blocks of decoded rows.

Positions. A lane's stream is an endless sequence of rows; its position is how many of them micro batches have
consumed. The positions of all lanes are the whole data-loader state (`StageBatches.state`); a run restored from
them (`StageBatches.restore`) serves the same micro batches as an uninterrupted one.

Micro batches. Without a token budget a micro batch is the lane's next `micro_batch` samples. With
train.max_tokens_per_micro_batch it takes samples in lane order while the next one still fits the budget (the
family's `sample_tokens` counts a sample's tokens in the packed sequence); a sample that alone exceeds the
budget is an error naming it. As in BAGEL's packed training, the number of samples per micro batch then varies,
and each micro batch weighs the same in the step's gradient.

Workers. With num_workers > 0 a lane's blocks are read and decoded by torch DataLoader worker processes, block
k of the lane's stream by worker k mod num_workers; the DataLoader hands the blocks back in stream order, so the
micro batches do not depend on num_workers. Each worker holds the block it decodes and up to prefetch_factor
decoded blocks waiting in the queue.

Order. The order is not that of the loader before streaming (one permutation of all decoded samples per epoch):
serving a uniform permutation of every row needs random access to single rows, which a parquet file offers only
a row group at a time (a whole row group read per sample) or by holding every row. Shuffling row groups, and rows
within a window of row groups, reads each row group once per epoch.

Mixture (train.stages.<stage>.mixture, model.config.StageConfig). Without one, the datasets' row groups are
units of one stream, so each dataset comes in proportion to its rows. With one, each dataset gets its share of
the samples: every lane reads each dataset as its own stream (the scheme above over that dataset's units only,
seeded by the run's seed and the dataset's name, so a small dataset simply cycles through its epochs faster), and
the lane's stream interleaves them slot by slot as its `MixSchedule` says (each chunk of 256 slots holds the
shares to within one slot per dataset, in an order drawn from the seed and the lane). A position is still
one number per lane: the slots before it say where each dataset's stream stands, so resuming, the rank's lanes
and the DataLoader workers (one DataLoader per dataset stream) behave as without a mixture.

Only clean rows are trained on: rows validation quarantined (validation/quarantine/<name>.parquet next to the
data root) are skipped, and a row that fails to decode when it is reached is skipped too (recorded by
`DecodeLedger`, written to the stage's quarantine folder) as long as, with the rows validation quarantined, no more
than max_quarantine_fraction of its dataset is lost; past it, DataDecodeError names the dataset, the shard file,
the row and its key, and the fix. `load_examples` decodes whole datasets with the same rules, checking the
fraction after reading all of it.

Over 400 lines on purpose: lanes, shuffling windows, mixtures, quarantine and resume positions are one determinism
contract (the same batches for any worker count, exact resume); split, that contract would span files.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch.utils.data

from data.formats import scone_s2i
from data.quarantine import fix_hint, row_key, row_problems, validation_quarantine_path, write_quarantine

# Scone-S2I-57K has image + instruction; our datasets add metadata (qa feeds the understanding loss).
REQUIRED_COLUMNS = ("image", "instruction")
OPTIONAL_COLUMNS = ("key", "qa", "task_type")  # task_type: understanding rows are understanding-only examples

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


def _columns(pf: pq.ParquetFile, name: str, shard: str) -> list[str]:
    names = pf.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"dataset {name}, {shard}: missing column(s) {missing}; a Scone-S2I shard needs "
                         f"{list(REQUIRED_COLUMNS)}; {fix_hint(name, row=False)}")
    return list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]


def _shard_rows(root: str | Path, name: str):
    """(shard name, index in the shard, row) for every row of a dataset, a row group at a time."""
    for path in dataset_files(root, name):
        shard = scone_s2i.shard_name(root, path)
        with pq.ParquetFile(path) as pf:
            cols = _columns(pf, name, shard)
            index = 0
            for g in range(pf.num_row_groups):
                for row in pf.read_row_group(g, columns=cols, use_threads=False).to_pylist():
                    yield shard, index, row
                    index += 1


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


def _is_quarantined(skip: set[tuple], shard: str, index: int, key: str) -> bool:
    return (shard, index, key) in skip or (None, None, key) in skip


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


def _decode(rows: list[dict], examples_from_rows) -> list[tuple[Any, str | None]]:
    """(example, None) or (None, why it fails) per row. Decodes all rows at once (the usual case); only when that
    fails, row by row to find the culprits."""
    if not rows:
        return []
    try:
        examples = list(examples_from_rows(rows))
        if len(examples) == len(rows):
            return [(e, None) for e in examples]
    except Exception:  # noqa: BLE001 (any failure of the model's decoding is a finding about some row)
        pass
    out = []
    for row in rows:
        try:
            examples = list(examples_from_rows([row]))
        except Exception as e:  # noqa: BLE001
            out.append((None, _decode_problem(row, e)))
            continue
        out.append((examples[0], None) if len(examples) == 1 else
                   (None, f"decodes to {len(examples)} examples, expected 1"))
    return out


def _quarantine_record(row: dict, shard: str, index: int, key: str) -> dict:
    return {**row, scone_s2i.SHARD_COLUMN: shard, scone_s2i.ROW_COLUMN: index, "key": key}


def _unusable(name: str, findings: list[str], lost: int, total: int, skipped: int, failing: int,
              max_fraction: float) -> DataDecodeError:
    more = "".join(f"\n  {f}" for f in findings[1:6])
    return DataDecodeError(
        f"{findings[0]}; {fix_hint(name)}\n  {lost} of {total} rows unusable ({lost / total:.1%} > "
        f"data.quality.max_quarantine_fraction={max_fraction:g}: {skipped} quarantined by validation, "
        f"{failing} failing to decode now){more}")


def _load_dataset(root, name: str, examples_from_rows, max_fraction: float, quarantine_dir) -> list:
    skip = quarantined_rows(root, name)
    examples, bad, total, skipped = [], [], 0, 0
    group: list[tuple[str, int, str, dict]] = []

    def flush():
        for (shard, index, key, row), (example, problem) in zip(group, _decode([g[3] for g in group],
                                                                                examples_from_rows)):
            if problem is None:
                examples.append(example)
            else:
                bad.append((row, (shard, index, key), problem))
        group.clear()

    for shard, index, row in _shard_rows(root, name):
        total += 1
        key = row_key(row)
        if _is_quarantined(skip, shard, index, key):
            skipped += 1
            continue
        group.append((shard, index, key, row))
        if len(group) >= 64:  # decoded in bounded batches; the result is all of them anyway
            flush()
    flush()
    lost = skipped + len(bad)
    findings = [f"{_where(name, *source)}: {reason}" for _, source, reason in bad]
    if bad and lost / max(total, 1) > max_fraction:
        raise _unusable(name, findings, lost, total, skipped, len(bad), max_fraction)
    if bad:
        log.warning("dataset %s: %d row(s) fail to decode and are left out (%d of %d rows unusable, within "
                    "data.quality.max_quarantine_fraction=%g):\n  %s", name, len(bad), lost, total, max_fraction,
                    "\n  ".join(findings))
        if quarantine_dir is not None:
            records = [(_quarantine_record(row, *source), reason) for row, source, reason in bad]
            write_quarantine(records, None, name, path=Path(quarantine_dir) / f"{name}.parquet")
    if not examples:
        raise ValueError(f"dataset {name!r} under {root} has no rows" + (f" ({skipped} quarantined by validation)" if skipped else ""))
    return examples


def load_examples(root: str | Path, names: Sequence[str], examples_from_rows: Callable[[list[dict]], list], *,
                  max_quarantine_fraction: float = 0.05, quarantine_dir: str | Path | None = None) -> list:
    """Examples of the clean rows of datasets `names`, concatenated in that order; decoded once per process.

    All of them in memory: for small datasets and checks (the stage trainer streams, see `StageBatches`).
    Rows that fail to decode are left out (and written to `quarantine_dir`/<name>.parquet when given) unless,
    with the rows validation quarantined, more than `max_quarantine_fraction` of the dataset is lost:
    DataDecodeError."""
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


# ---------------------------------------------------------------------------------------------------------------
# the stage's rows: units, lanes, blocks


@dataclass(frozen=True)
class Unit:
    """Rows [lo, hi) of one parquet row group: what a lane reads in one go."""

    dataset: str
    path: str
    shard: str
    group: int
    first_row: int  # index in its file of the group's first row: rows are named by their index in the file
    lo: int
    hi: int
    columns: tuple[str, ...]

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo


class StageIndex:
    """The row groups of a stage's datasets (from the parquet footers: no row is read) and the rows validation
    quarantined."""

    def __init__(self, root: str | Path, names: Sequence[str]):
        self.root = Path(root)
        self.names = list(names)
        self.groups: list[Unit] = []
        self.rows: dict[str, int] = {}
        for name in self.names:
            count = 0
            for path in dataset_files(root, name):
                shard = scone_s2i.shard_name(root, path)
                with pq.ParquetFile(path) as pf:
                    cols = tuple(_columns(pf, name, shard))
                    first = 0
                    for g in range(pf.metadata.num_row_groups):
                        n = pf.metadata.row_group(g).num_rows
                        if n:
                            self.groups.append(Unit(name, str(path), shard, g, first, 0, n, cols))
                        first += n
                count += first
            if not count:
                raise ValueError(f"dataset {name!r} under {root} has no rows")
            self.rows[name] = count
        self.quarantined = {name: quarantined_rows(root, name) for name in self.names}

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def units(self, lanes: int, dataset: str | None = None) -> list[Unit]:
        """The row groups (of `dataset` only, when given), each whole unless there are fewer of them than lanes:
        then each is cut into up to k row slices, k the smallest that gives every lane a unit (two lanes then read
        the same row group)."""
        groups = [g for g in self.groups if dataset is None or g.dataset == dataset]
        for k in range(1, lanes + 1):
            if sum(min(k, g.num_rows) for g in groups) >= lanes:
                break
        else:
            names = self.names if dataset is None else [dataset]
            rows = self.total_rows if dataset is None else self.rows[dataset]
            raise ValueError(f"datasets {names} have {rows} rows, fewer than the {lanes} lanes "
                             f"(num_ranks x grad_accum) that read them")
        out = []
        for g in groups:
            parts = min(k, g.num_rows)
            bounds = [g.num_rows * i // parts for i in range(parts + 1)]
            out += [Unit(g.dataset, g.path, g.shard, g.group, g.first_row, lo, hi, g.columns)
                    for lo, hi in zip(bounds, bounds[1:])]
        return out


@dataclass(frozen=True)
class Block:
    """`window` consecutive units of a lane's share of an epoch, its rows shuffled together."""

    position: int  # lane stream position of the block's first row
    epoch: int
    units: tuple[Unit, ...]
    order: np.ndarray  # row k of the block is row order[k] of its units' rows, concatenated in unit order


def deal(sizes: Sequence[int], lanes: int, seed: int, epoch: int) -> list[list[int]]:
    """Units (by index) of each lane in epoch `epoch`: all of them, in a permutation drawn from (seed, epoch),
    each to the lane with the fewest rows so far (ties: the lowest lane)."""
    shares: list[list[int]] = [[] for _ in range(lanes)]
    heap = [(0, lane) for lane in range(lanes)]
    for u in np.random.default_rng([seed, epoch]).permutation(len(sizes)):
        rows, lane = heapq.heappop(heap)
        shares[lane].append(int(u))
        heapq.heappush(heap, (rows + int(sizes[u]), lane))
    return shares


class LaneOrder:
    """The endless row stream of one lane (see the module docstring): epoch by epoch, block by block."""

    def __init__(self, units: Sequence[Unit], lanes: int, lane: int, seed: int, window: int):
        if not 0 <= lane < lanes:
            raise ValueError(f"lane {lane} outside {lanes} lanes")
        if window < 1:
            raise ValueError(f"shuffle window must be >= 1 row group, got {window}")
        if len(units) < lanes:
            raise ValueError(f"{len(units)} units for {lanes} lanes: some lane would have no rows")
        self.units = list(units)
        self.sizes = [u.num_rows for u in self.units]
        self.lanes, self.lane, self.seed, self.window = lanes, lane, seed, window
        self._shares: dict[int, list[int]] = {}

    def share(self, epoch: int) -> list[int]:
        if epoch not in self._shares:
            if len(self._shares) > 4:
                self._shares.clear()
            self._shares[epoch] = deal(self.sizes, self.lanes, self.seed, epoch)[self.lane]
        return self._shares[epoch]

    def blocks(self, start: int = 0) -> Iterator[Block]:
        """The blocks from the one holding stream position `start` on."""
        epoch, base = 0, 0
        while base + (n := sum(self.sizes[u] for u in self.share(epoch))) <= start:
            base += n
            epoch += 1
        while True:
            share = self.share(epoch)
            for b in range(0, len(share), self.window):
                units = tuple(self.units[u] for u in share[b:b + self.window])
                rows = sum(u.num_rows for u in units)
                if base + rows > start:
                    order = np.random.default_rng([self.seed, epoch, self.lane, b // self.window]).permutation(rows)
                    yield Block(base, epoch, units, order)
                base += rows
            epoch += 1


def mixture_shares(index: StageIndex, mixture: dict[str, float] | None) -> list[float]:
    """Share of a stage's samples per dataset (in `index.names` order): a dataset `mixture` names gets its share,
    the others split the rest in proportion to their rows (model.config.StageConfig.mixture)."""
    mixture = mixture or {}
    unknown = sorted(set(mixture) - set(index.names))
    if unknown:
        raise ValueError(f"mixture names {unknown}, which are not among the stage's datasets {index.names}")
    rest = [n for n in index.names if n not in mixture]
    left = 1.0 - sum(mixture.values())
    rows = sum(index.rows[n] for n in rest)
    return [float(mixture[n]) if n in mixture else left * index.rows[n] / rows for n in index.names]


def stream_seed(seed: int, dataset: str) -> int:
    """The seed of one dataset's own stream in a mixed stage: a function of the run's seed and the dataset's name
    only, so its order does not depend on the other datasets of the stage or on their order."""
    return int(np.random.SeedSequence([seed, zlib.crc32(dataset.encode())]).generate_state(1)[0])


class MixSchedule:
    """Which dataset each slot of a lane's mixed stream comes from.

    Slots come in chunks of `chunk`. Over the first n = k * chunk slots dataset d holds floor(n C_d) -
    floor(n C_{d-1}) of them (C the cumulative shares), so at every chunk boundary the shares hold to within one
    slot per dataset; within a chunk the slots are in an order drawn from (seed, lane, chunk). A function of (seed, lane, position) only, so
    the number of slots each dataset had before any position (where its own stream resumes) is computed, not
    stored."""

    SALT = 0x6D6978  # keeps these draws apart from the lane orders' ones

    def __init__(self, shares: Sequence[float], seed: int, lane: int, chunk: int = 256):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 slot, got {chunk}")
        total = float(sum(shares))
        self.cumulative = np.cumsum(np.asarray(shares, dtype=np.float64) / total)
        self.cumulative[-1] = 1.0
        self.seed, self.lane, self.chunk = seed, lane, chunk
        self._order: tuple[int, np.ndarray] | None = None

    def counts(self, n: int) -> np.ndarray:
        """Slots of each dataset among the first n (whole chunks: the exact allocation)."""
        bounds = np.floor(n * self.cumulative).astype(np.int64)
        bounds[-1] = n
        return np.diff(bounds, prepend=0)

    def chunk_order(self, j: int) -> np.ndarray:
        if self._order is None or self._order[0] != j:
            per = self.counts((j + 1) * self.chunk) - self.counts(j * self.chunk)
            slots = np.repeat(np.arange(len(per)), per)
            rng = np.random.default_rng([self.seed, self.SALT, self.lane, j])
            self._order = (j, slots[rng.permutation(len(slots))])
        return self._order[1]

    def dataset_at(self, position: int) -> int:
        j, k = divmod(position, self.chunk)
        return int(self.chunk_order(j)[k])

    def before(self, position: int) -> np.ndarray:
        """Slots of each dataset before `position` (where each dataset's stream stands there)."""
        j, k = divmod(position, self.chunk)
        head = np.bincount(self.chunk_order(j)[:k], minlength=len(self.cumulative))
        return self.counts(j * self.chunk) + head


@dataclass
class Entry:
    """One row of a lane's stream, as read: an example to train on, or why there is none."""

    position: int
    dataset: str
    shard: str
    row: int
    key: str
    example: Any = None
    problem: str | None = None  # a decode failure; None without an example: validation quarantined the row
    record: dict | None = None  # the failing row as stored, for the quarantine file
    tokens: int | None = None  # set by the packer


def read_block(block: Block, start: int, quarantined: dict[str, set], examples_from_rows) -> list[Entry]:
    """Entries of `block` from stream position `start` on: its units read (one row group read each), the rows
    decoded in one call (row by row where that fails)."""
    rows: list[dict] = []
    where: list[tuple[Unit, int]] = []
    for u in block.units:
        with pq.ParquetFile(u.path) as pf:
            table = pf.read_row_group(u.group, columns=list(u.columns), use_threads=False)
        rows += table.slice(u.lo, u.num_rows).to_pylist()
        where += [(u, u.first_row + i) for i in range(u.lo, u.hi)]
        del table
    entries, todo = [], []
    for k in range(max(0, start - block.position), len(block.order)):
        i = int(block.order[k])
        u, index = where[i]
        key = row_key(rows[i])
        entry = Entry(block.position + k, u.dataset, u.shard, index, key)
        entries.append(entry)
        if not _is_quarantined(quarantined[u.dataset], u.shard, index, key):
            todo.append((entry, rows[i]))
    for (entry, row), (example, problem) in zip(todo, _decode([r for _, r in todo], examples_from_rows)):
        entry.example, entry.problem = example, problem
        if problem is not None:
            entry.record = _quarantine_record(row, entry.shard, entry.row, entry.key)
    return entries


class LaneBlocks(torch.utils.data.IterableDataset):
    """A lane's decoded blocks from stream position `start` on, for a torch DataLoader: worker w of n decodes the
    blocks k with k mod n == w, which the DataLoader returns in order (it asks its workers in turn)."""

    def __init__(self, order: LaneOrder, start: int, quarantined: dict[str, set], examples_from_rows):
        self.order, self.start = order, start
        self.quarantined = quarantined
        self.examples_from_rows = examples_from_rows

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, block in enumerate(self.order.blocks(self.start)):
            if k % workers == worker:
                # yielded, never bound here: the generator must not keep a decoded block alive past its use
                yield read_block(block, self.start, self.quarantined, self.examples_from_rows)


def _as_is(item):
    return item  # the default collate_fn would turn the examples' numpy arrays into tensors


# ---------------------------------------------------------------------------------------------------------------
# decode failures at training time


class DecodeLedger:
    """Rows that fail to decode when training reaches them, per dataset, held against max_quarantine_fraction
    together with the rows validation quarantined (a dataset's share lost only grows, so the check is exact as
    soon as the rows are found). A rank finds the failures of the rows it reads; `export` / `merge` pool them."""

    def __init__(self, index: StageIndex, max_fraction: float):
        self.total = dict(index.rows)
        self.skipped = {name: len(index.quarantined[name]) for name in index.names}
        self.max_fraction = max_fraction
        # dataset -> (shard, row) -> (key, reason, the row as stored with its shard and row)
        self.failures: dict[str, dict[tuple[str, int], tuple[str, str, dict]]] = {n: {} for n in index.names}

    def add(self, entry: Entry) -> None:
        found = self.failures[entry.dataset]
        if (entry.shard, entry.row) in found:
            return
        found[(entry.shard, entry.row)] = (entry.key, entry.problem, entry.record)
        self._check(entry.dataset, newest=(entry.shard, entry.row))

    def _check(self, name: str, newest: tuple[str, int] | None = None) -> None:
        found = self.failures[name]
        lost, total, skipped = self.skipped[name] + len(found), self.total[name], self.skipped[name]
        items = sorted(found.items(), key=lambda kv: kv[0] != newest)  # the row just found first
        findings = [f"{_where(name, shard, row, key)}: {reason}" for (shard, row), (key, reason, _) in items]
        if found and lost / total > self.max_fraction:
            raise _unusable(name, findings, lost, total, skipped, len(found), self.max_fraction)
        if newest is not None:
            log.warning("%s; left out (%d of %d rows of dataset %s unusable, within "
                        "data.quality.max_quarantine_fraction=%g)", findings[0], lost, total, name, self.max_fraction)

    def export(self) -> dict:
        return {name: dict(found) for name, found in self.failures.items()}

    def merge(self, exported: dict) -> None:
        """Add failures other ranks found (or an earlier run wrote); DataDecodeError if they cross the line."""
        for name, found in exported.items():
            if name in self.failures:
                for where, value in found.items():
                    self.failures[name].setdefault(where, value)
                self._check(name)

    def write(self, directory: str | Path) -> None:
        """<directory>/<name>.parquet of every dataset: its failing rows (by shard and row), or no file."""
        for name, found in self.failures.items():
            records = [(record, reason) for _, (_, reason, record) in sorted(found.items())]
            write_quarantine(records, None, name, path=Path(directory) / f"{name}.parquet")

    def read(self, directory: str | Path) -> None:
        """Failures a run of the same stage wrote before it was interrupted (`write`)."""
        exported = {}
        for name in self.failures:
            path = Path(directory) / f"{name}.parquet"
            if path.exists():
                exported[name] = {(rec[scone_s2i.SHARD_COLUMN], int(rec[scone_s2i.ROW_COLUMN])):
                                  (rec["key"], rec["reason"], {k: v for k, v in rec.items() if k != "reason"})
                                  for rec in pq.read_table(path).to_pylist()}
        self.merge(exported)


# ---------------------------------------------------------------------------------------------------------------
# micro batches


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
        """Samples per step without a token budget."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def lanes(self) -> int:
        return self.grad_accum * self.world_size

    def chunk(self, micro_step: int) -> int:
        """The lane of this rank's micro batch at `micro_step` (its index inside the step's micro batches)."""
        return micro_step * self.world_size + self.rank

    @property
    def own_lanes(self) -> list[int]:
        return [self.chunk(m) for m in range(self.grad_accum)]


class _LaneCursor:
    """A lane's stream in this process: its DataLoader and how far micro batches have taken it."""

    def __init__(self, dataset: LaneBlocks, num_workers: int, ledger: DecodeLedger, patience: int):
        self.position = dataset.start
        self.ledger = ledger
        self.patience = patience
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        self._blocks = iter(loader)
        self._pending: deque[Entry] = deque()

    def peek(self) -> Entry:
        """The next entry with an example (not consumed); failures passed on the way go to the ledger."""
        passed = 0
        while True:
            while not self._pending:
                self._pending.extend(next(self._blocks))
            entry = self._pending[0]
            if entry.example is not None:
                return entry
            self._pending.popleft()
            if entry.problem is not None:
                self.ledger.add(entry)
            passed += 1
            if passed > self.patience:
                raise ValueError(f"{passed} rows in a row are quarantined or fail to decode (the last: "
                                 f"{_where(entry.dataset, entry.shard, entry.row, entry.key)}): the stage's "
                                 "datasets have next to no usable rows")

    def take(self) -> Entry:
        entry = self.peek()
        self._pending.popleft()
        self.position = entry.position + 1
        return entry

    def pop_raw(self) -> Entry:
        """The next entry, with an example or not (a mixed stream accounts for its slots itself)."""
        while not self._pending:
            self._pending.extend(next(self._blocks))
        return self._pending.popleft()

    def close(self) -> None:
        self._blocks = None  # a multi-process iterator shuts its workers down when it goes
        self._pending.clear()


class _MixedCursor:
    """A lane's mixed stream: slot p is the next row of dataset `schedule.dataset_at(p)`'s own stream. The lane's
    position counts slots, a row that is quarantined or fails to decode included, as in a plain lane, so the
    position alone says where every dataset's stream stands (`MixSchedule.before`)."""

    def __init__(self, orders: Sequence[LaneOrder], schedule: MixSchedule, start: int, quarantined: dict[str, set],
                 examples_from_rows, num_workers: int, ledger: DecodeLedger, patience: int):
        self.position = self._next = start
        self.schedule = schedule
        self.ledger = ledger
        self.patience = patience
        self.streams = [_LaneCursor(LaneBlocks(order, int(at), quarantined, examples_from_rows), num_workers,
                                    ledger, patience)
                        for order, at in zip(orders, schedule.before(start))]
        self._head: Entry | None = None

    def peek(self) -> Entry:
        passed = 0
        while True:
            if self._head is None:
                raw = self.streams[self.schedule.dataset_at(self._next)].pop_raw()
                self._head = dataclasses.replace(raw, position=self._next)
            entry = self._head
            if entry.example is not None:
                return entry
            self._head = None
            self._next += 1
            if entry.problem is not None:
                self.ledger.add(entry)
            passed += 1
            if passed > self.patience:
                raise ValueError(f"{passed} rows in a row are quarantined or fail to decode (the last: "
                                 f"{_where(entry.dataset, entry.shard, entry.row, entry.key)}): the stage's "
                                 "datasets have next to no usable rows")

    def take(self) -> Entry:
        entry = self.peek()
        self._head = None
        self.position = self._next = entry.position + 1
        return entry

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self._head = None


class StageBatches:
    """This rank's micro batches: lane `sharding.chunk(micro_step)` serves the micro batch of `micro_step`.

    `sample_tokens(example) -> int` with `max_tokens` packs micro batches by token budget; without, each holds
    `sharding.micro_batch` samples. Micro batches are served in order: call `restore` (if resuming) before the
    first, then `micro_batch(0 .. grad_accum - 1)` each step."""

    def __init__(self, index: StageIndex, examples_from_rows: Callable[[list[dict]], list],
                 collate: Callable[[list], Any], *, seed: int, sharding: Sharding, max_tokens: int | None = None,
                 sample_tokens: Callable[[Any], int] | None = None, window: int = 4, num_workers: int = 0,
                 max_quarantine_fraction: float = 0.05, mixture: dict[str, float] | None = None):
        if max_tokens is not None and sample_tokens is None:
            raise ValueError("a token budget (train.max_tokens_per_micro_batch) needs the model family's "
                             "sample_tokens")
        self.index = index
        self.examples_from_rows = examples_from_rows
        self.collate = collate
        self.sharding = sharding
        self.max_tokens = max_tokens
        self.sample_tokens = sample_tokens
        self.num_workers = num_workers
        self.ledger = DecodeLedger(index, max_quarantine_fraction)
        self.shares: list[float] | None = None
        if mixture:  # one stream per dataset and lane, interleaved by each lane's MixSchedule
            self.shares = mixture_shares(index, mixture)
            per_dataset = [(index.units(sharding.lanes, name), stream_seed(seed, name)) for name in index.names]
            self.orders = {lane: [LaneOrder(units, sharding.lanes, lane, s, window) for units, s in per_dataset]
                           for lane in sharding.own_lanes}
            self.schedules = {lane: MixSchedule(self.shares, seed, lane) for lane in sharding.own_lanes}
        else:
            units = index.units(sharding.lanes)
            self.orders = {lane: LaneOrder(units, sharding.lanes, lane, seed, window) for lane in sharding.own_lanes}
        self.positions = {lane: 0 for lane in sharding.own_lanes}
        self.samples = 0  # samples this rank has served since construction
        self._cursors: dict[int, _LaneCursor] = {}

    def restore(self, positions: Sequence[int]) -> None:
        """Continue from the positions of all lanes (`state()["lanes"]` of every rank, pooled)."""
        if self._cursors:
            raise RuntimeError("restore before the first micro batch")
        if len(positions) != self.sharding.lanes:
            raise ValueError(f"{len(positions)} lane positions for {self.sharding.lanes} lanes")
        self.positions = {lane: int(positions[lane]) for lane in self.sharding.own_lanes}

    def state(self) -> dict:
        """This rank's lane positions and samples served."""
        return {"lanes": {lane: self._position(lane) for lane in self.sharding.own_lanes}, "samples": self.samples}

    def _position(self, lane: int) -> int:
        cursor = self._cursors.get(lane)
        return cursor.position if cursor is not None else self.positions[lane]

    def _cursor(self, lane: int) -> _LaneCursor | _MixedCursor:
        if lane not in self._cursors:
            if self.shares is not None:
                self._cursors[lane] = _MixedCursor(self.orders[lane], self.schedules[lane], self.positions[lane],
                                                   self.index.quarantined, self.examples_from_rows,
                                                   self.num_workers, self.ledger, self.index.total_rows)
            else:
                dataset = LaneBlocks(self.orders[lane], self.positions[lane], self.index.quarantined,
                                     self.examples_from_rows)
                self._cursors[lane] = _LaneCursor(dataset, self.num_workers, self.ledger, self.index.total_rows)
        return self._cursors[lane]

    def take(self, micro_step: int) -> list[Entry]:
        """The entries of this rank's next micro batch at `micro_step`."""
        cursor = self._cursor(self.sharding.chunk(micro_step))
        if self.max_tokens is None:
            out = [cursor.take() for _ in range(self.sharding.micro_batch)]
        else:
            out, used = [], 0
            while True:
                entry = cursor.peek()
                if entry.tokens is None:
                    entry.tokens = int(self.sample_tokens(entry.example))
                if entry.tokens > self.max_tokens:
                    raise ValueError(f"{_where(entry.dataset, entry.shard, entry.row, entry.key)} takes "
                                     f"{entry.tokens} tokens, more than train.max_tokens_per_micro_batch="
                                     f"{self.max_tokens}: raise the budget, or leave the sample out of the data")
                if used + entry.tokens > self.max_tokens:
                    break
                out.append(cursor.take())
                used += entry.tokens
        self.samples += len(out)
        return out

    def micro_batch(self, micro_step: int):
        return self.collate([e.example for e in self.take(micro_step)])

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
