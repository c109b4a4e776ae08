"""On-disk cache of the answers data.openai_client receives, keyed by everything that determines an answer.

Layout: `<root>/<key[:2]>/<key>.json` = {"answer": raw text, "usage": {...}, "model", "kind"}. The key is the
sha256 of the model, the request (messages with every image data URL replaced by its sha256, and the
sampling parameters: `request_digest`) and a repeat index (`answer_key`): how many times the client already
asked the identical request. Writes are atomic (temporary file + rename), so concurrent writers and
interrupted runs leave whole entries only; a damaged entry reads as a miss.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def _digest_part(part: dict) -> dict:
    if part.get("type") != "image_url":
        return part
    url = part["image_url"]["url"]
    return {**part, "image_url": {**part["image_url"], "url": "sha256:" + hashlib.sha256(url.encode()).hexdigest()}}


def request_digest(model: str, messages: list[dict], params: dict) -> str:
    """sha256 of the model and the request, image data replaced by digests: equal digests, identical question."""
    msgs = [{**m, "content": [_digest_part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]
    blob = json.dumps({"model": model, "request": {"messages": msgs, "params": params}}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def answer_key(digest: str, repeat: int = 0) -> str:
    """Cache key of the `repeat`-th asking of the request with this digest."""
    return hashlib.sha256(f"{digest}:{int(repeat)}".encode()).hexdigest()


class AnswerCache:
    """get/put of answer records by key under `root` (thread-safe; writes are atomic)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged entry is a miss; the fresh answer overwrites it

    def put(self, key: str, record: dict) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, sort_keys=True)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("??/*.json")) if self.root.is_dir() else 0
