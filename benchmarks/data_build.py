"""`scone bench data-build`: rows per second of building (draw + render + encode + write), one process vs
all cores, and a check that both builds wrote identical bytes."""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from data.build import build_dataset
from data.catalog import BASE
from data.config import DataConfig
from data.parallel import worker_count

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.parquet")) + sorted((root / "parquet_info").glob("*.json")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _timed_build(cfg: DataConfig, name: str) -> tuple[float, dict]:
    started = time.perf_counter()
    summary = build_dataset(name, cfg)
    return time.perf_counter() - started, summary


def run(params: Params, out: Path, dataset: str = BASE) -> dict:
    """Build `dataset` (params.data sizes) with 1 worker and with every core, in a scratch root; JSON to `out`."""
    data: DataConfig = params.data
    cores = worker_count(0)
    result: dict = {"dataset": dataset, "cores": cores}
    with tempfile.TemporaryDirectory(prefix="scone-data-bench-") as tmp:
        digests = {}
        for label, workers in (("one_process", 1), ("all_cores", cores)):
            cfg = data.model_copy(update={"root": str(Path(tmp) / label / "data"), "num_workers": workers})
            seconds, summary = _timed_build(cfg, dataset)
            rows = summary["rows"] + summary["quarantined"]
            result[label] = {"workers": workers, "rows": rows, "seconds": round(seconds, 6), "rows_per_s": round(rows / seconds, 2)}
            digests[label] = _digest(Path(cfg.root))
    result["speedup"] = round(result["one_process"]["seconds"] / result["all_cores"]["seconds"], 3)
    result["identical"] = digests["one_process"] == digests["all_cores"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
