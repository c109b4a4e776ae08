"""Skip work whose inputs have not changed since it last ran (a re-run of the pipeline redoes only what changed).

A stamp is a JSON file next to a step's outputs holding the fingerprint of everything the outputs depend on.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from registry.tracking import file_md5

STAMP = ".inputs.json"


def tree_md5(path: Path) -> str:
    """md5 over the relative names and contents of every file under `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    h = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != STAMP):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(file_md5(f).encode())
    return h.hexdigest()


def fingerprint(inputs: dict) -> dict:
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def is_fresh(out_dir: Path, inputs: dict, required: list[Path]) -> bool:
    stamp = Path(out_dir) / STAMP
    if not stamp.exists() or not all(Path(p).exists() for p in required):
        return False
    return json.loads(stamp.read_text()) == fingerprint(inputs)


def write_stamp(out_dir: Path, inputs: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / STAMP).write_text(json.dumps(fingerprint(inputs), indent=1, sort_keys=True))
