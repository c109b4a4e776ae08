"""Rendering rows over processes: chunks of cases go to a pool, rows come back in case order.

Every row is a pure function of its case, so the output does not depend on the number of workers or on
which worker rendered which chunk (the build is byte-identical for any `data.num_workers`).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading

from data.records import Case


def _render_chunk(cases: list[Case]) -> list[dict]:
    return [c.to_row() for c in cases]


def worker_count(num_workers: int) -> int:
    """`data.num_workers`: 0 means every core this process may use."""
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
    if num_workers:
        return num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def render_rows(cases: list[Case], num_workers: int, chunk_size: int) -> list[dict]:
    """Rows of `cases` in order; more than one worker renders chunks of `chunk_size` cases in parallel."""
    workers = min(worker_count(num_workers), max(1, -(-len(cases) // max(chunk_size, 1))))
    if workers <= 1:
        return _render_chunk(cases)
    chunks = [cases[i : i + chunk_size] for i in range(0, len(cases), chunk_size)]
    with _context().Pool(workers) as pool:
        rendered = pool.map(_render_chunk, chunks, chunksize=1)
    return [row for chunk in rendered for row in chunk]


def _context():
    """fork when this process has no other thread (cheap, and safe then); spawn inside threaded hosts
    (Prefect task runners, MLflow), where a forked child could inherit a held lock. Spawned workers
    re-import the main module: scripts must guard their entry point with `if __name__ == "__main__":`."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")
