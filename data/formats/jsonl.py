"""JSON Lines reading shared by every *.jsonl format here: blank lines skipped, a bad line named by path:line."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list:
    """One parsed value per non-blank line; ValueError naming `path:line` on a line that is not JSON."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows
