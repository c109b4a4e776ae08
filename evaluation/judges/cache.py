"""On-disk cache of judge answers, keyed by everything that determines the answer.

The key is the sha256 of the model name, the request (messages with every image replaced by the
sha256 of its data URL, i.e. of its PNG bytes, and the sampling parameters: `request_digest`) and
a repeat index (`answer_key`): how many times this judge instance already asked the identical
request. The protocol scores each round several times (Scone Sec. 5.1) to average out the judge's
sampling, so the second scoring must not be served the first one's answer; a re-run of the same
evaluation asks the same requests in the same order and so is served from disk entirely.

Layout: `<root>/<key[:2]>/<key>.json` = {"answer": raw text, "usage": {...}, "model": ...}; only
answers that parsed are stored (a malformed answer is asked again next time). Writes are atomic
(temporary file + rename), so concurrent writers and interrupted runs leave whole entries only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path


def image_digest(url: str) -> str:
    """sha256 of an image URL: for a data URL, of its (deterministically encoded) base64 payload."""
    return hashlib.sha256(url.encode()).hexdigest()


def _digest_part(part: dict) -> dict:
    if part.get("type") != "image_url":
        return part
    return {**part, "image_url": {**part["image_url"], "url": "sha256:" + image_digest(part["image_url"]["url"])}}


def canonical_request(messages: list[dict], params: dict) -> dict:
    """The request with image data replaced by digests: what the answer depends on, small enough to key."""
    msgs = [
        {**m, "content": [_digest_part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
        for m in messages
    ]
    return {"messages": msgs, "params": params}


def request_digest(model: str, messages: list[dict], params: dict) -> str:
    """sha256 of the model and the canonical request: equal digests mean the identical question."""
    blob = json.dumps({"model": model, "request": canonical_request(messages, params)}, sort_keys=True, separators=(",", ":"))
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
        p = self.path(key)
        try:
            return json.loads(p.read_text())
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


class RepeatCounter:
    """How many times each request key was asked before (the `repeat` of answer_key)."""

    def __init__(self):
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def next(self, base_key: str) -> int:
        with self._lock:
            n = self._seen.get(base_key, 0)
            self._seen[base_key] = n + 1
            return n
