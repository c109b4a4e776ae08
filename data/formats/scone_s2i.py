"""Training shards in the Scone-S2I-57K layout.

    <root>/parquet_data/<name>/part-00000.parquet   columns: image (list<binary>, PNG, references then the
                                                    target last), instruction, + our metadata columns
    <root>/parquet_info/<name>.json                 {"parquet_data/<name>/part-00000.parquet": {"num_row_groups": N}}

Scone's loader opens each file listed in parquet_info and reads it row group by row group; our keys are
relative to <root> (portable across checkouts) and the readers also accept the absolute paths that the
released Scone-S2I-57K info files carry.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data.records import Case

ROW_GROUPS_PER_FILE = 4
# Where a row came from (iter_rows(with_source=True)); underscored so they never clash with data columns.
SHARD_COLUMN, ROW_COLUMN = "_shard", "_row"
SCHEMA = pa.schema(
    [("image", pa.list_(pa.binary()))]
    + [(c, pa.string()) for c in ("instruction", "key", "task_type", "case_type", "scene_graph", "subject_list", "subject_label", "qa", "meta")]
)


def data_dir(root: str | Path, name: str) -> Path:
    return Path(root) / "parquet_data" / name


def info_path(root: str | Path, name: str) -> Path:
    return Path(root) / "parquet_info" / f"{name}.json"


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_rows(
    rows: Iterable[dict], root: str | Path, name: str, rows_per_row_group: int, rows_per_file: int | None = None, schema: pa.Schema = SCHEMA
) -> list[Path]:
    """Write row dicts (see `Case.to_row`) as shards; replaces any previous shards of `name`.

    `schema` is ours by default; imported data keeps the schema it came with."""
    if rows_per_row_group < 1:
        raise ValueError(f"rows_per_row_group must be >= 1, got {rows_per_row_group}")
    rows_per_file = rows_per_file or rows_per_row_group * ROW_GROUPS_PER_FILE
    if rows_per_file < rows_per_row_group:
        raise ValueError(f"rows_per_file ({rows_per_file}) must be >= rows_per_row_group ({rows_per_row_group})")
    root = Path(root)
    out_dir = data_dir(root, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.parquet"):  # a smaller rebuild must not leave old parts behind
        stale.unlink()
    info: dict[str, dict] = {}
    paths = []
    for file_index, file_rows in enumerate(_chunks(rows, rows_per_file)):
        path = out_dir / f"part-{file_index:05d}.parquet"
        groups = 0
        with pq.ParquetWriter(path, schema) as writer:
            for group in _chunks(file_rows, rows_per_row_group):
                writer.write_table(pa.Table.from_pylist(group, schema=schema), row_group_size=len(group))
                groups += 1
        info[path.relative_to(root).as_posix()] = {"num_row_groups": groups}
        paths.append(path)
    if not paths:
        raise ValueError(f"dataset {name}: no rows to write")
    ipath = info_path(root, name)
    ipath.parent.mkdir(parents=True, exist_ok=True)
    ipath.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return paths


def write_dataset(cases: Iterable[Case], root: str | Path, name: str, rows_per_row_group: int, rows_per_file: int | None = None) -> list[Path]:
    """Render and write cases; returns the parquet files written."""
    return write_rows((c.to_row() for c in cases), root, name, rows_per_row_group, rows_per_file)


def read_info(root: str | Path, name: str) -> dict[str, dict]:
    path = info_path(root, name)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the dataset first (data.build.build_dataset({name!r}, cfg))")
    return json.loads(path.read_text())


def resolve_file(root: str | Path, name: str, key: str) -> Path:
    """The parquet file a parquet_info key names: relative to root, absolute, or (stale absolute path) by file name."""
    root = Path(root)
    for candidate in (Path(key), root / key, data_dir(root, name) / Path(key).name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"parquet_info/{name}.json lists {key}, which exists neither as given nor under {root}")


def parquet_files(root: str | Path, name: str) -> list[Path]:
    return [resolve_file(root, name, key) for key in sorted(read_info(root, name))]


def shard_name(root: str | Path, path: Path) -> str:
    """How messages name a shard: relative to the data root (released absolute paths outside it stay absolute)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def iter_rows(root: str | Path, name: str, *, with_source: bool = False) -> Iterator[dict]:
    """Rows as stored, one row group at a time: `image` is list[bytes], JSON metadata columns are strings.

    with_source: each row also carries SHARD_COLUMN (its file, see `shard_name`) and ROW_COLUMN (its index in
    that file), so a finding about the row can say where to look."""
    for path in parquet_files(root, name):
        pf = pq.ParquetFile(path)
        shard, index = shard_name(root, path), 0
        for g in range(pf.num_row_groups):
            for row in pf.read_row_group(g).to_pylist():
                if with_source:
                    row[SHARD_COLUMN], row[ROW_COLUMN] = shard, index
                index += 1
                yield row


def read_cases(root: str | Path, name: str) -> list[Case]:
    return [Case.from_row(r) for r in iter_rows(root, name)]
