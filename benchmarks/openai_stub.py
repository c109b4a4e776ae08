"""A local OpenAI-compatible chat endpoint for the judge benchmark and the judge tests (127.0.0.1 only, a free port).

`POST /v1/chat/completions` answers like a VLM judge would, deterministically: the answer is derived
from a sha256 of the request's text and image parts, so the same question always gets the same
score. Under the released judge protocol (evaluation.judges.released) a presence request ("a single
character: 0 or 1") gets a bare `0` or `1` and a request naming `"reasoning"` gets `{"score": 0..10,
"reasoning"}`; under the strict one a request whose text mentions the field `"present"` gets `{"reason",
"present": 0|1}`, any other `{"reason", "score": 0..10}` (evaluation.judges.prompts); the SRUM reward
judge's requests get their shapes (evaluation.srum): a `"regions"` request one entry per `Region k:` line,
a request asking for "a number from -1 to 1" `{"reason", "score": -1..1}`.

Behaviour is scripted per test (`configure`) and applied to requests in arrival order:

    fail_429=N   the first N requests get 429 with a Retry-After header (`retry_after`)
    fail_500=N   the next N get 500
    stall=N      the next N sleep `stall_s` before answering (past the client's timeout)
    garbage=True every answer is prose instead of JSON
    latency_s    every request sleeps this long first (simulated model latency)
    gate=N       hold each request until N are in flight at once (or `gate_timeout_s` passes),
                 which makes "requests overlap" a fact to count rather than a timing to measure
    usage=(p, c) fixed prompt/completion token counts instead of the size-derived ones

Counters (`stats()`): requests, answered (200s), max_in_flight, and the token sums of every usage
field returned. In-process use: `with StubServer(latency_s=0.01) as s: ... s.base_url ...`.
From another process: `python -m benchmarks.openai_stub --latency 0.3` prints `PORT <n>` and
serves until killed; GET /stub/stats and POST /stub/configure, /stub/reset do the same over HTTP.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Behaviour:
    latency_s: float = 0.0
    fail_429: int = 0
    retry_after: str = "0"
    fail_500: int = 0
    stall: int = 0
    stall_s: float = 1.0
    garbage: bool = False
    gate: int = 0
    gate_timeout_s: float = 5.0
    usage: tuple[int, int] | None = None


@dataclass
class Stats:
    requests: int = 0
    answered: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bodies: list = field(default_factory=list)

    def public(self) -> dict:
        d = asdict(self)
        d.pop("bodies")
        d.pop("in_flight")
        return d


def request_parts(body: dict) -> tuple[str, list[str]]:
    """All text of the request's messages, joined, and the image URLs, in order."""
    texts, images = [], []
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                images.append(part["image_url"]["url"])
    return "\n".join(texts), images


def answer_for(body: dict) -> str:
    """The deterministic well-formed answer to a judge request."""
    text, images = request_parts(body)
    digest = hashlib.sha256((text + "\n".join(images)).encode()).digest()
    if '"regions"' in text:  # the SRUM regional request: one entry per "Region k:" line, scores in [-1, 1]
        n = len(re.findall(r"^Region \d+:", text, re.MULTILINE))
        return json.dumps({"regions": [{"region": k + 1, "object": f"stub object {k + 1}", "reason": "stub",
                                        "score": round(digest[k % 32] / 127.5 - 1.0, 3)} for k in range(n)]})
    if "from -1 to 1" in text:  # the SRUM global layout request
        return json.dumps({"reason": "stub layout", "score": round(digest[0] / 127.5 - 1.0, 3)})
    if "single character: 0 or 1" in text:  # the released protocol's presence request: a bare digit
        return str(digest[0] % 2)
    if '"reasoning"' in text:  # the released protocol's PF / SC request (evaluation.judges.released)
        return json.dumps({"score": digest[0] % 11, "reasoning": f"stub score {digest[0] % 11}"})
    if '"present"' in text:
        return json.dumps({"reason": f"stub verdict {digest[0] % 2}", "present": digest[0] % 2})
    return json.dumps({"reason": f"stub score {digest[0] % 11}", "score": digest[0] % 11})


def usage_for(body: dict, answer: str, fixed: tuple[int, int] | None) -> tuple[int, int]:
    if fixed is not None:
        return int(fixed[0]), int(fixed[1])
    text, images = request_parts(body)
    return len(text) // 4 + 85 * len(images), max(1, len(answer) // 4)


class StubServer:
    """The endpoint on 127.0.0.1:<free port>, served by daemon threads."""

    def __init__(self, latency_s: float = 0.0, keep_bodies: bool = True, **behaviour):
        self.behaviour = Behaviour(latency_s=latency_s, **behaviour)
        self.keep_bodies = keep_bodies
        self._stats = Stats()
        self._lock = threading.Lock()
        self._gate = threading.Condition(self._lock)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control

    def configure(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                if not hasattr(self.behaviour, k):
                    raise TypeError(f"unknown stub behaviour {k!r}; known: {sorted(asdict(self.behaviour))}")
                setattr(self.behaviour, k, tuple(v) if k == "usage" and v is not None else v)

    def reset(self) -> None:
        with self._lock:
            self._stats = Stats()

    def stats(self) -> dict:
        with self._lock:
            return self._stats.public()

    def bodies(self) -> list[dict]:
        with self._lock:
            return list(self._stats.bodies)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "StubServer":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints
            # one segment per response, sent at once: split small writes would meet the client's delayed
            # ACK (~40 ms a request) and measure TCP, not the judge
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path == "/stub/stats":
                    return self._json(200, stub.stats())
                self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length) if length else b""
                if self.path == "/stub/configure":
                    try:
                        stub.configure(**json.loads(raw or b"{}"))
                    except TypeError as e:
                        return self._json(400, {"error": {"message": str(e)}})
                    return self._json(200, asdict(stub.behaviour))
                if self.path == "/stub/reset":
                    stub.reset()
                    return self._json(200, {})
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._json(404, {"error": {"message": f"no route {self.path}"}})
                stub._serve_completion(self, json.loads(raw))

            def _json(self, status: int, payload, headers: dict | None = None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # a burst of concurrent clients must not overflow the listen backlog

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ one request

    def _serve_completion(self, handler, body: dict) -> None:
        with self._lock:
            b = self.behaviour
            s = self._stats
            s.requests += 1
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            if self.keep_bodies:
                s.bodies.append(body)
            if b.fail_429 > 0:
                b.fail_429 -= 1
                action = "429"
            elif b.fail_500 > 0:
                b.fail_500 -= 1
                action = "500"
            elif b.stall > 0:
                b.stall -= 1
                action = "stall"
            else:
                action = "garbage" if b.garbage else "answer"
            self._gate.notify_all()
            if b.gate > 1:
                deadline = time.monotonic() + b.gate_timeout_s
                while s.in_flight < b.gate and s.max_in_flight < b.gate and time.monotonic() < deadline:
                    self._gate.wait(timeout=max(0.0, deadline - time.monotonic()))
            latency, stall_s, retry_after, fixed_usage = b.latency_s, b.stall_s, b.retry_after, b.usage
        try:
            if latency > 0:
                time.sleep(latency)
            if action == "429":
                handler._json(429, {"error": {"message": "rate limited (stub)", "type": "rate_limit"}},
                              {"Retry-After": retry_after})
            elif action == "500":
                handler._json(500, {"error": {"message": "internal error (stub)", "type": "server_error"}})
            else:
                if action == "stall":
                    time.sleep(stall_s)
                answer = answer_for(body) if action == "answer" else "Looks pretty good to me, I would say eight."
                prompt_tokens, completion_tokens = usage_for(body, answer, fixed_usage)
                with self._lock:
                    self._stats.answered += 1
                    self._stats.prompt_tokens += prompt_tokens
                    self._stats.completion_tokens += completion_tokens
                try:
                    handler._json(200, completion(body.get("model", "stub"), answer, prompt_tokens, completion_tokens))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to deliver
        finally:
            with self._lock:
                self._stats.in_flight -= 1


def completion(model: str, answer: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.0, help="seconds every request sleeps")
    args = p.parse_args(argv)
    server = StubServer(latency_s=args.latency, keep_bodies=False).start()
    print(f"PORT {server.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
