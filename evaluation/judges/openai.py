"""The `openai` judge: SconeEval scores from any OpenAI-compatible VLM endpoint.

Per case, as the protocol asks (Scone Sec. 4.3): `composition` sends two requests at once, prompt
following and subject consistency (0-10 each, with a rationale), both showing the input images and
the generated one; `presence` sends one request per candidate (the reference image and the generated
one). Prompts and the accepted answers: evaluation.judges.prompts.

Scale. Requests run on one asyncio event loop in a background thread, at most
`eval.openai.concurrency` in flight (an asyncio.Semaphore). The judge methods are plain blocking
calls that are safe from any number of threads: the runner's ThreadPoolExecutor with `concurrency`
workers keeps the semaphore full. Everything but the HTTP exchange (image encoding, cache reads and
writes) runs on the calling thread, so the loop only waits on sockets.

Failures are loud. 408/409/429, 5xx, timeouts, connection errors and answers that do not parse are
retried up to `max_retries` times with exponential backoff (`backoff_s` doubling up to
`backoff_max_s`, jittered to 50-100 %), never shorter than a Retry-After / retry-after-ms header
asks; then the request fails with an exception naming the case, the request and the last error
(`JudgeRequestError`, or `JudgeAnswerError` with the raw answer). Other statuses (400, 401, 404, ...)
fail at once. No score is ever made up.

Cache: evaluation.judges.cache (model + request + image sha256s + repeat index) under
`eval.openai.cache_dir`. Accounting: `usage()` sums the usage field of every response (retries
and malformed answers included: they are billed) and prices it with `price_per_1k_input/output`.

Endpoint: `eval.openai.base_url`, else OPENAI_BASE_URL, else api.openai.com. Key: OPENAI_API_KEY; a
loopback endpoint (127.0.0.1, localhost, ::1) without one gets a placeholder, any other fails
when the judge is built.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import ipaddress
import json
import os
import random
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Coroutine
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletion
from PIL import Image
from pydantic import BaseModel

from evaluation.config import OpenAIJudgeConfig
from evaluation.judges import prompts
from evaluation.judges.cache import AnswerCache, RepeatCounter, answer_key, request_digest
from evaluation.judges.prompts import JudgeAnswerError, PresenceAnswer, ScoreAnswer

DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOOPBACK_PLACEHOLDER_KEY = "local-endpoint-no-key"
RETRY_STATUSES = {408, 409, 429}


class JudgeConfigError(ValueError):
    """The openai judge cannot be built from this configuration (endpoint or key)."""


class JudgeRequestError(RuntimeError):
    """A judge request failed for good (after its retries, or with a status not worth retrying)."""


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


def resolve_api_key(explicit: str | None, base_url: str) -> str:
    key = explicit or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if is_loopback(base_url):
        return LOOPBACK_PLACEHOLDER_KEY
    raise JudgeConfigError(
        f"eval.judge=openai needs an API key for {base_url}: set OPENAI_API_KEY, or point eval.openai.base_url "
        "(or OPENAI_BASE_URL) at a local endpoint on 127.0.0.1"
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
    """Delay before retry `attempt` (0 = the first retry): base * 2^attempt capped, scaled by
    `jitter` in [0.5, 1] so clients that failed together do not retry together; a server's
    Retry-After is a floor."""
    delay = min(cap_s, base_s * (2.0**attempt)) * jitter
    return max(delay, retry_after) if retry_after is not None else delay


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, JudgeAnswerError)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRY_STATUSES or error.status_code >= 500
    return False


def describe_error(error: BaseException, timeout_s: float) -> str:
    if isinstance(error, openai.APITimeoutError):
        return f"timed out after {timeout_s:g} s"
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {error.message}"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error.__context__
        return f"connection error: {cause or error}"
    return f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------- accounting


@dataclass
class Usage:
    """What a judge instance spent; thread-safe counters."""

    requests: int = 0  # HTTP requests sent (retries included)
    answers: int = 0  # valid answers received from the endpoint
    cache_hits: int = 0
    retries: int = 0
    backoff_s: float = 0.0  # time spent waiting before retries
    malformed_answers: int = 0
    responses_without_usage: int = 0  # their tokens are unknown: the cost is a lower bound then
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: dict = field(default_factory=lambda: {"prompt_following": 0, "subject_consistency": 0, "presence": 0})
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


def cost_usd(prompt_tokens: int, completion_tokens: int, cfg: OpenAIJudgeConfig) -> float:
    return prompt_tokens / 1000.0 * cfg.price_per_1k_input + completion_tokens / 1000.0 * cfg.price_per_1k_output


# ---------------------------------------------------------------------------------------- images


def image_data_url(image, size: int) -> str:
    """PNG data URL of an RGB image, its longer side brought to `size` with nearest-neighbour
    resampling (pixel-exact blocks; 0 keeps the size)."""
    from evaluation.detect import to_array

    img = Image.fromarray(to_array(image))
    if size and max(img.size) != size:
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast: the bytes are small either way
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_messages(text: str, images: list[tuple[str, str]]) -> list[dict]:
    """System + one user message: the request text, then each image after its label."""
    content: list[dict] = [{"type": "text", "text": text}]
    for label, url in images:
        content.append({"type": "text", "text": label})
        content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "system", "content": prompts.SYSTEM}, {"role": "user", "content": content}]


@dataclass
class Job:
    """One request: who asks (for error messages), what, and which answer shape is accepted."""

    case_key: str
    kind: str  # prompt_following | subject_consistency | presence
    what: str  # human label, e.g. "presence of 'the red circle' (image 1)"
    messages: list[dict]
    schema: type[BaseModel]
    key: str | None = None  # cache key, set when the cache is on


# ---------------------------------------------------------------------------------------- the judge


class OpenAIJudge:
    name = "openai"
    deterministic = False

    def __init__(
        self,
        cfg: OpenAIJudgeConfig | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        cache_dir: str | Path | None = None,
        seed: int | None = None,
    ):
        self.cfg = cfg or OpenAIJudgeConfig()
        self.model = self.cfg.model
        self.base_url = resolve_base_url(base_url or self.cfg.base_url)
        self._api_key = resolve_api_key(api_key, self.base_url)
        self.cache = AnswerCache(cache_dir or self.cfg.cache_dir) if self.cfg.cache else None
        self.params: dict[str, Any] = {} if self.cfg.temperature is None else {"temperature": self.cfg.temperature}
        self._usage = Usage()
        self._repeats = RepeatCounter()
        self._rng = random.Random(seed)
        self._images: OrderedDict[tuple, Any] = OrderedDict()
        self._images_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None

    @classmethod
    def from_config(cls, eval_cfg=None, checkpoint_dir=None, **kwargs) -> "OpenAIJudge":
        """From EvalConfig (reads `eval_cfg.openai`); `checkpoint_dir` is accepted and unused, so one
        make_judge call can serve every backend."""
        return cls(getattr(eval_cfg, "openai", None), **kwargs)

    @property
    def concurrency(self) -> int:
        return self.cfg.concurrency

    # ------------------------------------------------------------------ the judge protocol

    def composition(self, case, image) -> tuple[float, float, tuple[str, str]]:
        shown = self._reference_images(case) + [("Generated image:", self.image_url(image))]
        pf, sc = self.ask([
            Job(case.key, "prompt_following", "prompt following", chat_messages(prompts.prompt_following(case), shown), ScoreAnswer),
            Job(case.key, "subject_consistency", "subject consistency", chat_messages(prompts.subject_consistency(case), shown), ScoreAnswer),
        ])
        return float(pf.score), float(sc.score), (pf.reason, sc.reason)

    def presence(self, case, ref_index: int, phrase: str, image) -> tuple[int, str]:
        refs = self._reference_images(case)
        if not 0 <= ref_index < len(refs):
            raise IndexError(f"case {case.key}: reference index {ref_index} out of range ({len(refs)} input images)")
        if phrase not in case.subject_list[ref_index]:
            raise ValueError(f"case {case.key}: {phrase!r} is not a candidate of image {ref_index + 1} ({case.subject_list[ref_index]})")
        shown = [("Reference image:", refs[ref_index][1]), ("Target image:", self.image_url(image))]
        (answer,) = self.ask([
            Job(case.key, "presence", f"presence of {phrase!r} (image {ref_index + 1})",
                chat_messages(prompts.presence(case, ref_index, phrase), shown), PresenceAnswer),
        ])
        return int(answer.present), answer.reason

    # ------------------------------------------------------------------ accounting

    def usage(self) -> dict:
        """Counters and cost of this judge so far (JSON-ready)."""
        u = self._usage.snapshot()
        u.update(
            model=self.model,
            base_url=self.base_url,
            concurrency=self.cfg.concurrency,
            total_tokens=u["prompt_tokens"] + u["completion_tokens"],
            price_per_1k_input=self.cfg.price_per_1k_input,
            price_per_1k_output=self.cfg.price_per_1k_output,
            cost_usd=round(cost_usd(u["prompt_tokens"], u["completion_tokens"], self.cfg), 6),
            cache_dir=str(self.cache.root) if self.cache else None,
        )
        return u

    def write_usage(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.usage(), indent=2, sort_keys=True) + "\n")
        return path

    # ------------------------------------------------------------------ requests

    def _remember(self, key: tuple, make):
        """A small LRU of encoded images: a case's images are sent with each of its requests."""
        with self._images_lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        value = make()
        with self._images_lock:
            self._images[key] = value
            while len(self._images) > 512:
                self._images.popitem(last=False)
        return value

    def _reference_images(self, case) -> list[tuple[str, str]]:
        """(label, data URL) of the case's input images."""
        from evaluation.runner import reference_images

        paths = tuple((getattr(case, "meta", None) or {}).get("input_images") or ())
        key = ("refs", paths) if paths else ("refs", case.key, repr(case.references))
        return self._remember(key, lambda: [
            (f"Input image {i + 1}:", image_data_url(im, self.cfg.image_size)) for i, im in enumerate(reference_images(case))
        ])

    def image_url(self, image) -> str:
        """The data URL an image is sent as (cached, sized as the config says); also used by other judges."""
        from evaluation.detect import to_array

        arr = to_array(image)
        key = ("output", arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
        return self._remember(key, lambda: image_data_url(arr, self.cfg.image_size))

    def ask(self, jobs: list[Job]) -> list[Any]:
        """Parsed answers to `jobs`, from the cache or the endpoint (all misses in flight together). Any
        judge on this client (e.g. the SRUM reward judge) sends its requests through here."""
        answers: list[Any] = [None] * len(jobs)
        misses = []
        for i, job in enumerate(jobs):
            self._usage.call(job.kind)
            if self.cache is None:
                misses.append(i)
                continue
            digest = request_digest(self.model, job.messages, self.params)
            job.key = answer_key(digest, self._repeats.next(digest))
            hit = self.cache.get(job.key)
            if hit is not None:
                try:
                    answers[i] = prompts.parse_answer(hit.get("answer"), job.schema, case_key=job.case_key, what=job.what)
                    self._usage.add(cache_hits=1)
                    continue
                except JudgeAnswerError:
                    pass  # an entry the current rules reject: ask again
            misses.append(i)
        if misses:
            results = self._run(self._gather([jobs[i] for i in misses]))
            errors = [r for r in results if isinstance(r, BaseException)]
            for i, result in zip(misses, results):
                if isinstance(result, BaseException):
                    continue
                parsed, raw, usage = result
                answers[i] = parsed
                if self.cache is not None:
                    self.cache.put(jobs[i].key, {"answer": raw, "usage": usage, "model": self.model, "kind": jobs[i].kind})
            if errors:
                raise errors[0]
        return answers

    async def _gather(self, jobs: list[Job]) -> list:
        return await asyncio.gather(*(self._request(job) for job in jobs), return_exceptions=True)

    async def _request(self, job: Job) -> tuple[Any, str, dict | None]:
        attempts = self.cfg.max_retries + 1
        last: BaseException | None = None
        for attempt in range(attempts):
            delay = 0.0
            async with self._semaphore:
                self._usage.add(requests=1)
                try:
                    # POST /chat/completions through the client's own request path (auth, timeouts, status
                    # errors, ChatCompletion parsing); chat.completions.create would first walk every
                    # content part against its typed params (~3 ms a request here), which at 64 requests
                    # in flight is what one Python core spends its time on. The body is already wire format.
                    response = await self._client.post(
                        "/chat/completions",
                        body={"model": self.model, "messages": job.messages, **self.params},
                        cast_to=ChatCompletion,
                        options={"timeout": self.cfg.timeout_s},
                    )
                except openai.APIError as e:
                    if not is_retryable(e):
                        raise JudgeRequestError(
                            f"case {job.case_key}: {job.what} request to {self.base_url} (model {self.model}) failed: "
                            f"{describe_error(e, self.cfg.timeout_s)}; not retried"
                        ) from e
                    last = e
                    headers = getattr(getattr(e, "response", None), "headers", None)
                    delay = backoff_delay(attempt, self.cfg.backoff_s, self.cfg.backoff_max_s, retry_after_s(headers),
                                          0.5 + 0.5 * self._rng.random())
                else:
                    usage = self._account(response)
                    raw = response.choices[0].message.content if response.choices else None
                    try:
                        parsed = prompts.parse_answer(raw, job.schema, case_key=job.case_key, what=job.what)
                    except JudgeAnswerError as e:
                        self._usage.add(malformed_answers=1)
                        last = e  # asked again at once: a sampled answer may come out right next time
                    else:
                        self._usage.add(answers=1)
                        return parsed, raw, usage
            if attempt + 1 < attempts:
                self._usage.add(retries=1, backoff_s=delay)
                await asyncio.sleep(delay)  # outside the semaphore: a waiting request holds no slot
        if isinstance(last, JudgeAnswerError):
            raise JudgeAnswerError(f"{last}\n(after {attempts} attempt{'s' * (attempts > 1)})") from None
        raise JudgeRequestError(
            f"case {job.case_key}: {job.what} request to {self.base_url} (model {self.model}) failed after "
            f"{attempts} attempt{'s' * (attempts > 1)}; last error: {describe_error(last, self.cfg.timeout_s)}"
        ) from last

    def _account(self, response) -> dict | None:
        u = getattr(response, "usage", None)
        if u is None:
            self._usage.add(responses_without_usage=1)
            return None
        p, c = int(u.prompt_tokens or 0), int(u.completion_tokens or 0)
        self._usage.add(prompt_tokens=p, completion_tokens=c)
        return {"prompt_tokens": p, "completion_tokens": c}

    # ------------------------------------------------------------------ the event loop thread

    def _run(self, coro: Coroutine):
        """Run `coro` on the judge's loop and wait for it (from any thread but the loop's own)."""
        self._start()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("OpenAIJudge methods block; do not call them from the judge's own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _start(self) -> None:
        if self._loop is not None:
            return
        with self._start_lock:
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="openai-judge-loop", daemon=True)
            thread.start()

            async def setup():
                self._semaphore = asyncio.Semaphore(self.cfg.concurrency)
                self._client = openai.AsyncOpenAI(
                    api_key=self._api_key, base_url=self.base_url, max_retries=0, timeout=self.cfg.timeout_s
                )

            asyncio.run_coroutine_threadsafe(setup(), loop).result()
            self._thread, self._loop = thread, loop
            # a judge dropped without close() must not leave its loop thread running
            self._finalizer = weakref.finalize(self, _stop_loop, loop)

    def close(self) -> None:
        """Close the HTTP client and stop the loop thread (the judge restarts them if used again)."""
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

    def __enter__(self) -> "OpenAIJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
