"""JSON Lines reading shared by every *.jsonl file of the project: blank lines skipped, a bad line named by
path:line, or handed to the caller's `on_bad_line` (to collect it, or to ignore it in a file another process may be
appending to, whose last line can be cut short)."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

# on_bad_line(line number, the line, why it is not JSON); the line is then left out
BadLine = Callable[[int, str, str], object]


def ignore_bad_line(n: int, line: str, why: str) -> None:
    """`on_bad_line` for files read while another process may still be writing them (metrics.jsonl)."""


def iter_jsonl(path: str | Path, on_bad_line: BadLine | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) per non-blank line. A line that is not JSON: ValueError naming `path:line`, or,
    given `on_bad_line`, that call and the line left out."""
    path = Path(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if on_bad_line is None:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            on_bad_line(n, line, e.msg)
            continue
        yield n, value


def read_jsonl(path: str | Path, on_bad_line: BadLine | None = None) -> list:
    """One parsed value per non-blank line; see `iter_jsonl` for a line that is not JSON."""
    return [value for _, value in iter_jsonl(path, on_bad_line)]
