"""The one OpenAI-compatible chat client of the project: endpoint and key rules, retries, an on-disk answer
cache, bounded concurrency and usage accounting, for every caller that asks an LLM or a VLM: the `openai`
judge and the SRUM reward judge (evaluation.judges) and the instruction writer (data.llm_writer).

Why in data/: it is the bottom of the import direction (data <- model <- evaluation <- registry <- tasks <-
flows), so the instruction writer can use it without importing upward, and it needs nothing of the project
but data.config's Strict base. A top-level utility package would have served too, at the price of a new
layer in the packaging and the architecture; the client is one module, so it lives with its lowest caller.

Requests. A caller hands `ask()` a list of `Request`s: chat messages in wire format, a `parse` function that
turns the raw answer into what the caller wants (raising `AnswerError` when the answer is unusable), and a
label and a description that lead every error message ("case d1: presence of 'the red circle' ..."). All
misses of one `ask` are in flight together, at most `concurrency` at once (an asyncio.Semaphore on one event
loop in a background thread); `ask` is a plain blocking call that is safe from any number of threads.

Failures are loud. 408/409/429, 5xx, timeouts, connection errors and unusable answers are retried up to
`max_retries` times with exponential backoff (`backoff_s` doubling up to `backoff_max_s`, jittered to
50-100 %), never shorter than a Retry-After / retry-after-ms header asks; then the request fails with an
exception naming the caller's label, the request and the last error (`RequestError`, or the caller's
`AnswerError` with the raw answer). Other statuses (400, 401, 404, ...) fail at once. Nothing is made up.

Cache (`cache: true`): data.openai_cache, keyed by the model, the request and a repeat index. A judge
scores each round several times to average out its own sampling, so its second asking of an identical
request must not be served the first one's answer (`Request.repeat=True`); a re-run asks the same requests in
the same order and is served from disk entirely. A caller that wants one answer per question (the instruction
writer) sends `repeat=False`. Only answers that parse are stored, and a stored answer the current `parse`
rejects is asked again.

Endpoint: the configured `base_url`, else OPENAI_BASE_URL, else api.openai.com. Key: the explicit one, else
the environment variable `api_key_env` (OPENAI_API_KEY); a loopback endpoint (127.0.0.1, localhost, ::1)
without one gets a placeholder, any other fails when the client is built.

Over 400 lines on purpose: endpoint rules, retries, concurrency and cost accounting are one contract every caller
relies on together (the cache lives in data/openai_cache.py).
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Coroutine
from urllib.parse import urlsplit

from pydantic import Field

from data.config import Strict
from data.openai_cache import AnswerCache, answer_key, request_digest

DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOOPBACK_PLACEHOLDER_KEY = "local-endpoint-no-key"
RETRY_STATUSES = {408, 409, 429}


class EndpointConfigError(ValueError):
    """No client can be built from this configuration (endpoint or key)."""


class RequestError(RuntimeError):
    """A request failed for good (after its retries, or with a status not worth retrying)."""


class AnswerError(ValueError):
    """An answer is not what its request asked for. Subclasses take one message argument."""


class EndpointConfig(Strict):
    """Where and how a client asks; sections of params.yaml extend it (evaluation.config.OpenAIJudgeConfig)."""

    model: str = "gpt-4.1"
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint; OPENAI_BASE_URL is used when null")
    concurrency: int = Field(16, ge=1, description="requests in flight at once")
    max_retries: int = Field(5, ge=0, description="retries of a request (429, 5xx, timeout, unusable answer) before failing")
    timeout_s: float = Field(60.0, gt=0)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry, jittered; Retry-After wins when longer")
    backoff_max_s: float = Field(30.0, ge=0, description="cap of the exponential retry delay")
    temperature: float | None = Field(None, ge=0, le=2, description="null: the endpoint's default")
    cache: bool = Field(True, description="answers are cached on disk under cache_dir")
    cache_dir: str = "artifacts/cache/openai"
    price_per_1k_input: float = Field(0.0, ge=0)
    price_per_1k_output: float = Field(0.0, ge=0)


# ---------------------------------------------------------------------------------------- endpoint


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_base_url(configured: str | None) -> str:
    return configured or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL


def resolve_api_key(explicit: str | None, base_url: str, env: str = "OPENAI_API_KEY") -> str:
    key = explicit or os.environ.get(env)
    if key:
        return key
    if is_loopback(base_url):
        return LOOPBACK_PLACEHOLDER_KEY
    raise EndpointConfigError(
        f"the endpoint {base_url} needs an API key: set {env}, or point base_url (or OPENAI_BASE_URL) at a local "
        "endpoint on 127.0.0.1"
    )


# ---------------------------------------------------------------------------------------- retries


def retry_after_s(headers) -> float | None:
    """Seconds a response asks to wait (retry-after-ms, or retry-after as seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, base_s: float, cap_s: float, retry_after: float | None, jitter: float) -> float:
    """Delay before retry `attempt` (0 = the first retry): base * 2^attempt capped, scaled by `jitter` in
    [0.5, 1] so clients that failed together do not retry together; a server's Retry-After is a floor."""
    delay = min(cap_s, base_s * (2.0**attempt)) * jitter
    return max(delay, retry_after) if retry_after is not None else delay


def is_retryable(error: BaseException) -> bool:
    import openai

    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, AnswerError)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRY_STATUSES or error.status_code >= 500
    return False


def describe_error(error: BaseException, timeout_s: float) -> str:
    import openai

    if isinstance(error, openai.APITimeoutError):
        return f"timed out after {timeout_s:g} s"
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {error.message}"
    if isinstance(error, openai.APIConnectionError):
        return f"connection error: {error.__cause__ or error.__context__ or error}"
    return f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------- accounting


@dataclass
class Usage:
    """What a client spent; thread-safe counters."""

    requests: int = 0  # HTTP requests sent (retries included)
    answers: int = 0  # usable answers received from the endpoint
    cache_hits: int = 0
    retries: int = 0
    backoff_s: float = 0.0  # time spent waiting before retries
    malformed_answers: int = 0
    responses_without_usage: int = 0  # their tokens are unknown: the cost is a lower bound then
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: dict = field(default_factory=dict)  # Request.kind -> requests asked (cache hits included)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def call(self, kind: str) -> None:
        with self._lock:
            self.calls[kind] = self.calls.get(kind, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------- the client


@dataclass
class Request:
    """One question: who asks and what (for error messages), the messages, and how its answer is read."""

    label: str  # leads every error message, e.g. "case d1"
    kind: str  # counted in usage()["calls"], e.g. "presence"
    what: str  # e.g. "presence of 'the red circle' (image 1)"
    messages: list[dict]
    parse: Callable[[str | None], Any]  # raw answer -> value; raises AnswerError when unusable
    repeat: bool = True  # identical requests asked again are fresh samples, not cache hits
    key: str | None = None  # cache key, set by ask() when the cache is on


class ChatClient:
    """POST /chat/completions on an OpenAI-compatible endpoint for lists of `Request`s (module docstring)."""

    def __init__(self, cfg: EndpointConfig, *, base_url: str | None = None, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", cache_dir: str | Path | None = None, seed: int | None = None):
        self.cfg = cfg
        self.model = cfg.model
        self.base_url = resolve_base_url(base_url or cfg.base_url)
        self.api_key = resolve_api_key(api_key, self.base_url, api_key_env)
        self.cache = AnswerCache(cache_dir or cfg.cache_dir) if cfg.cache else None
        self.params: dict[str, Any] = {} if cfg.temperature is None else {"temperature": cfg.temperature}
        self._usage = Usage()
        self._seen: dict[str, int] = {}
        self._seen_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ asking

    def ask(self, requests: list[Request]) -> list[Any]:
        """Parsed answers to `requests`, from the cache or the endpoint (all misses in flight together). Answers
        that came back usable are cached even when another request of the list fails; then the first failure
        is raised."""
        answers: list[Any] = [None] * len(requests)
        misses = []
        for i, req in enumerate(requests):
            self._usage.call(req.kind)
            if self.cache is None:
                misses.append(i)
                continue
            digest = request_digest(self.model, req.messages, self.params)
            req.key = answer_key(digest, self._next_repeat(digest) if req.repeat else 0)
            hit = self.cache.get(req.key)
            if hit is not None:
                try:
                    answers[i] = req.parse(hit.get("answer"))
                    self._usage.add(cache_hits=1)
                    continue
                except AnswerError:
                    pass  # an entry the current rules reject: ask again
            misses.append(i)
        if misses:
            results = self._run(self._gather([requests[i] for i in misses]))
            for i, result in zip(misses, results):
                if isinstance(result, BaseException):
                    continue
                answers[i], raw, usage = result
                if self.cache is not None:
                    self.cache.put(requests[i].key, {"answer": raw, "usage": usage, "model": self.model,
                                                     "kind": requests[i].kind})
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        return answers

    def _next_repeat(self, digest: str) -> int:
        with self._seen_lock:
            n = self._seen.get(digest, 0)
            self._seen[digest] = n + 1
            return n

    async def _gather(self, requests: list[Request]) -> list:
        return await asyncio.gather(*(self._request(r) for r in requests), return_exceptions=True)

    async def _request(self, req: Request) -> tuple[Any, str, dict | None]:
        import openai
        from openai.types.chat import ChatCompletion

        attempts = self.cfg.max_retries + 1
        where = f"{req.label}: {req.what} request to {self.base_url} (model {self.model})"
        last: BaseException | None = None
        for attempt in range(attempts):
            delay = 0.0
            async with self._semaphore:
                self._usage.add(requests=1)
                try:
                    # POST through the client's own request path (auth, timeouts, status errors, parsing);
                    # chat.completions.create would first walk every content part against its typed params
                    # (~3 ms a request), which at 64 requests in flight is what one Python core spends its time
                    # on. The body is already wire format.
                    response = await self._client.post(
                        "/chat/completions", body={"model": self.model, "messages": req.messages, **self.params},
                        cast_to=ChatCompletion, options={"timeout": self.cfg.timeout_s},
                    )
                except openai.APIError as e:
                    if not is_retryable(e):
                        raise RequestError(f"{where} failed: {describe_error(e, self.cfg.timeout_s)}; not retried") from e
                    last = e
                    headers = getattr(getattr(e, "response", None), "headers", None)
                    delay = backoff_delay(attempt, self.cfg.backoff_s, self.cfg.backoff_max_s, retry_after_s(headers),
                                          0.5 + 0.5 * self._rng.random())
                else:
                    usage = self._account(response)
                    raw = response.choices[0].message.content if response.choices else None
                    try:
                        parsed = req.parse(raw)
                    except AnswerError as e:
                        self._usage.add(malformed_answers=1)
                        last = e  # asked again at once: a sampled answer may come out right next time
                    else:
                        self._usage.add(answers=1)
                        return parsed, raw, usage
            if attempt + 1 < attempts:
                self._usage.add(retries=1, backoff_s=delay)
                await asyncio.sleep(delay)  # outside the semaphore: a waiting request holds no slot
        tries = f"{attempts} attempt{'s' * (attempts > 1)}"
        if isinstance(last, AnswerError):
            raise type(last)(f"{last}\n(after {tries})") from None
        raise RequestError(f"{where} failed after {tries}; last error: {describe_error(last, self.cfg.timeout_s)}") from last

    def _account(self, response) -> dict | None:
        u = getattr(response, "usage", None)
        if u is None:
            self._usage.add(responses_without_usage=1)
            return None
        p, c = int(u.prompt_tokens or 0), int(u.completion_tokens or 0)
        self._usage.add(prompt_tokens=p, completion_tokens=c)
        return {"prompt_tokens": p, "completion_tokens": c}

    # ------------------------------------------------------------------ accounting

    def usage(self) -> dict:
        """Counters and cost so far (JSON-ready)."""
        u = self._usage.snapshot()
        cost = (u["prompt_tokens"] / 1000.0 * self.cfg.price_per_1k_input
                + u["completion_tokens"] / 1000.0 * self.cfg.price_per_1k_output)
        u.update(model=self.model, base_url=self.base_url, concurrency=self.cfg.concurrency,
                 total_tokens=u["prompt_tokens"] + u["completion_tokens"],
                 price_per_1k_input=self.cfg.price_per_1k_input, price_per_1k_output=self.cfg.price_per_1k_output,
                 cost_usd=round(cost, 6), cache_dir=str(self.cache.root) if self.cache else None)
        return u

    # ------------------------------------------------------------------ the event loop thread

    def _run(self, coro: Coroutine):
        """Run `coro` on the client's loop and wait for it (from any thread but the loop's own)."""
        self._start()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("ChatClient.ask blocks; do not call it from the client's own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _start(self) -> None:
        if self._loop is not None:
            return
        with self._start_lock:
            if self._loop is not None:
                return
            import openai

            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="openai-client-loop", daemon=True)
            thread.start()

            async def setup():
                self._semaphore = asyncio.Semaphore(self.cfg.concurrency)
                self._client = openai.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, max_retries=0,
                                                  timeout=self.cfg.timeout_s)

            asyncio.run_coroutine_threadsafe(setup(), loop).result()
            self._thread, self._loop = thread, loop
            # a client dropped without close() must not leave its loop thread running
            self._finalizer = weakref.finalize(self, _stop_loop, loop)

    def close(self) -> None:
        """Close the HTTP client and stop the loop thread (they restart if the client is used again)."""
        with self._start_lock:
            loop, thread, client = self._loop, self._thread, self._client
            if loop is None:
                return
            if client is not None:
                asyncio.run_coroutine_threadsafe(client.close(), loop).result()
            self._finalizer.detach()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = self._client = self._semaphore = None

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
