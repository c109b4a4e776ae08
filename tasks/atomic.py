"""Atomic outputs: a step writes into a staging folder and its result replaces the old output only on success.

A failed or killed step therefore leaves the previous good output exactly as it was. Staging folders live in
`<artifacts>/.staging/` (outside every DVC output); whatever a killed step left there is removed by the next
step that holds the artifacts lock (tasks.lock), which is the only writer.

The swap of one path is two renames (old -> trash, new -> place); a kill between them leaves the old output in
the trash, from where `recover` puts it back before anything reads the folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

STAGING = ".staging"
TRASH_SUFFIX = ".replaced"


def staging_root(artifacts: Path) -> Path:
    return Path(artifacts) / STAGING


def _trash(path: Path) -> Path:
    return path.with_name(path.name + TRASH_SUFFIX)


def recover(paths: list[Path]) -> list[Path]:
    """Put back outputs whose swap was interrupted between its two renames; returns the paths restored."""
    restored = []
    for p in map(Path, paths):
        trash = _trash(p)
        if trash.exists() and not p.exists():
            os.replace(trash, p)
            restored.append(p)
        elif trash.exists():  # the swap completed; only the old copy was left behind
            _remove(trash)
    return restored


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(new: Path, dest: Path) -> None:
    """Move `new` (file or folder) to `dest`, replacing what is there, never leaving `dest` half-written."""
    new, dest = Path(new), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    trash = _trash(dest)
    if trash.exists():
        _remove(trash)
    had_old = dest.exists()
    if had_old:
        os.replace(dest, trash)
    os.replace(new, dest)
    if had_old:
        _remove(trash)


def clear_staging(artifacts: Path, max_depth: int = 4) -> list[Path]:
    """Remove what killed steps left in staging and finish interrupted swaps (call with the artifacts lock held).

    Returns the outputs put back from an interrupted swap."""
    root = staging_root(artifacts)
    if root.exists():
        shutil.rmtree(root)
    artifacts = Path(artifacts)
    pending = []
    base_depth = len(artifacts.parts)
    for dirpath, dirnames, _ in os.walk(artifacts):
        here = Path(dirpath)
        pending += [here / d for d in dirnames if d.endswith(TRASH_SUFFIX)]
        pending += [here / f for f in os.listdir(here) if f.endswith(TRASH_SUFFIX) and (here / f).is_file()]
        # outputs sit a few levels down; MLflow's store and training state hold no swapped outputs
        dirnames[:] = [] if len(here.parts) - base_depth >= max_depth else [
            d for d in dirnames if not d.endswith(TRASH_SUFFIX) and d not in ("mlruns", "work", STAGING)]
    return recover([p.with_name(p.name[: -len(TRASH_SUFFIX)]) for p in pending])


@contextmanager
def staged(artifacts: Path, label: str) -> Iterator[Path]:
    """A fresh, empty staging folder for one step; removed afterwards whatever happens.

    The step publishes from it with `publish` before the block ends; on an exception nothing is published."""
    root = staging_root(artifacts)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(pairs: list[tuple[Path, Path]]) -> None:
    """Move each staged path to its destination (all staged paths must exist: a step that did not write one of
    its outputs has failed, and nothing is replaced)."""
    missing = [str(src) for src, _ in pairs if not Path(src).exists()]
    if missing:
        raise FileNotFoundError(f"step finished without writing {', '.join(missing)}; nothing was replaced")
    for src, dest in pairs:
        replace_path(src, dest)


def write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, **kw) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str, **kw) + "\n")


def repoint_json(folder: Path, staged_at: Path, final: Path) -> None:
    """Summaries written while staging name the staging path; make them name where the output now lives."""
    old, new = str(staged_at), str(final)
    for f in Path(folder).glob("*.json"):
        text = f.read_text()
        if old in text:
            f.write_text(text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1]))
