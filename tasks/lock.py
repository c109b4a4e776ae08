"""One writer per artifacts folder.

Every command that writes under `<artifacts>/` (the pipeline, `scone train|eval|srum|register|report|data`, and
the same commands run by `dvc repro`) holds an exclusive lock on `<artifacts>/.lock` while it works. A second
writer fails at once with a message naming the holder, instead of interleaving its outputs with the first one's
(mixed score groups, duplicate model versions, two MLflow schema migrations at once).

The lock is an OS file lock (flock): the kernel drops it when the holder exits, kill -9 included, so a crashed
run never leaves a stale lock behind. Re-entrant within a process: the pipeline holds it and calls the steps.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.holder.json"

_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth)


class ArtifactsLocked(RuntimeError):
    """Another process is writing the same artifacts folder."""


def _describe(holder_path: Path) -> str:
    try:
        h = json.loads(holder_path.read_text())
    except (OSError, ValueError):
        return "another process (no holder record)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("since", 0)))
    return f"pid {h.get('pid')} on {h.get('host')} ({h.get('command')}), since {started}"


@contextmanager
def artifacts_lock(artifacts: str | Path, command: str | None = None, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the write lock of `artifacts` for the block. `wait_s` > 0 waits that long for a busy lock."""
    root = Path(artifacts)
    root.mkdir(parents=True, exist_ok=True)
    path = (root / LOCK_FILE).resolve()
    key = str(path)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _describe(root / HOLDER_FILE)
                os.close(fd)
                raise ArtifactsLocked(
                    f"{root}/ is being written by {holder}; wait for it to finish (or stop it), then run again. "
                    f"One writer per artifacts folder keeps outputs, scores and model versions consistent."
                ) from None
            time.sleep(0.2)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])}
    (root / HOLDER_FILE).write_text(json.dumps(holder) + "\n")
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        _held.pop(key, None)
        try:
            (root / HOLDER_FILE).unlink(missing_ok=True)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
