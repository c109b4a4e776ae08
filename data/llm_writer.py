"""Scone step 2 written by an LLM: any OpenAI-compatible chat endpoint (`data.instruction_writer: openai`).

The LLM sees only what the instruction must convey, the referring phrases from step 1 with their image
numbers, target positions and the background, never the images, so it cannot name a distractor or mix up
images (Scone Sec. 4.2). Answers are cached on disk (key: model + prompt hash), requested concurrently
(at most data.llm.max_concurrency at once) and retried with exponential backoff on transport errors. An
answer that drops or changes a phrase, names a subject it was not given, or leaves the word list the
tokenizer knows is an error (LLMWriterError), never silently replaced by the template.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from data.config import DataConfig, LLMWriterConfig
from data.instructions import (
    BACKGROUND_PHRASES,
    SCENE_LINKS,
    TARGET_POSITION_PHRASES,
    VOCABULARY,
    InstructionPlan,
)
from data.records import Case
from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, SIZES, TEXTURES

SYSTEM_PROMPT = (
    "You write one instruction for an image generator that composes subjects taken from numbered input images. "
    "Use every subject phrase exactly as given, with its image number and position, and no other subject. "
    "Write lowercase words separated by spaces, ' , ' between clauses, no final full stop, only words from the "
    "allowed list. Answer with the instruction alone."
)
SUBJECT_WORDS = frozenset((*OBJECT_CATEGORIES, *CHARACTER_CATEGORIES, *COLOURS, *TEXTURES, *SIZES))


class LLMWriterError(RuntimeError):
    """The LLM could not be reached after retries or its answer broke the instruction rules."""


def clause(mention, layout: str) -> str:
    """'the red circle from image 1 on the left': one subject as the LLM must convey it."""
    where = "" if layout == "single" else f" {TARGET_POSITION_PHRASES[mention.slot]}"
    return f"{mention.phrase} from image {mention.image}{where}"


def background_text(plan: InstructionPlan) -> str:
    if plan.scene_image is not None:
        return SCENE_LINKS[0].format(k=plan.scene_image)
    return BACKGROUND_PHRASES[plan.background]


def build_prompt(plan: InstructionPlan) -> str:
    lines = ["Subjects:"] + [f"- {clause(m, plan.layout)}" for m in plan.mentions]
    lines += [f"Background: {background_text(plan)}", "Allowed words: " + " ".join(VOCABULARY)]
    return "\n".join(lines)


def normalise(text: str) -> str:
    text = text.strip().strip('"').strip().rstrip(".").lower()
    text = re.sub(r"\s*,\s*", " , ", text)
    return " ".join(text.split())


def check_instruction(text: str, plan: InstructionPlan) -> list[str]:
    """Problems of an LLM instruction for `plan` (empty = usable)."""
    if not text:
        return ["empty answer"]
    problems = []
    padded = f" {text} "
    for m in plan.mentions:
        if f" {m.phrase} " not in padded:
            problems.append(f"phrase {m.phrase!r} missing")
        if f" image {m.image} " not in padded and f" image {m.image} ," not in padded:
            problems.append(f"image {m.image} not named")
    words = text.split()
    unknown = sorted(set(words) - set(VOCABULARY))
    if unknown:
        problems.append(f"words outside the vocabulary: {unknown}")
    given = {w for m in plan.mentions for w in m.phrase.split()}
    invented = sorted((set(words) & SUBJECT_WORDS) - given)
    if invented:
        problems.append(f"subject words not in the given phrases: {invented}")
    return problems


@dataclass
class OpenAIWriter:
    """Writer (data.instructions.Writer) backed by an OpenAI-compatible endpoint, with a disk cache."""

    llm: LLMWriterConfig
    cache_dir: Path
    client: object | None = None

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        if self.client is None:
            from openai import OpenAI

            base_url = self.llm.base_url or os.environ.get("OPENAI_BASE_URL")
            key = os.environ.get(self.llm.api_key_env)
            if not key and not base_url:
                raise LLMWriterError(
                    f"instruction_writer=openai needs an endpoint: set {self.llm.api_key_env} (and OPENAI_BASE_URL or "
                    "data.llm.base_url for another OpenAI-compatible server), or set data.instruction_writer=template"
                )
            # our own retry loop (with backoff and a clear final error) replaces the SDK's
            self.client = OpenAI(base_url=base_url, api_key=key or "unused", max_retries=0, timeout=self.llm.timeout_s)

    def cache_path(self, prompt: str) -> Path:
        digest = hashlib.sha256(f"{self.llm.model}\n{SYSTEM_PROMPT}\n{prompt}".encode()).hexdigest()
        return self.cache_dir / f"{digest}.json"

    def _ask(self, prompt: str) -> str:
        import openai

        transient = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError)
        last: Exception | None = None
        for attempt in range(self.llm.max_retries + 1):
            try:
                answer = self.client.chat.completions.create(
                    model=self.llm.model,
                    temperature=self.llm.temperature,
                    messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
                )
                return answer.choices[0].message.content or ""
            except transient as e:
                last = e
                if attempt < self.llm.max_retries:
                    time.sleep(self.llm.backoff_s * 2**attempt)
            except openai.APIStatusError as e:  # 4xx: retrying will not help
                raise LLMWriterError(f"instruction LLM {self.llm.model} refused the request: {e}") from e
        raise LLMWriterError(
            f"instruction LLM {self.llm.model} unreachable after {self.llm.max_retries + 1} attempts: "
            f"{type(last).__name__}: {last}"
        ) from last

    def write(self, plan: InstructionPlan) -> str:
        prompt = build_prompt(plan)
        path = self.cache_path(prompt)
        if path.exists():
            return json.loads(path.read_text())["instruction"]
        raw = self._ask(prompt)
        text = normalise(raw)
        problems = check_instruction(text, plan)
        if problems:
            raise LLMWriterError(
                f"instruction LLM {self.llm.model} answered {raw!r}: {'; '.join(problems)}. Prompt:\n{prompt}\n"
                "Use a stronger model, or data.instruction_writer=template"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": self.llm.model, "prompt": prompt, "instruction": text}, sort_keys=True))
        tmp.replace(path)  # atomic: concurrent builds never read half an entry
        return text

    def write_many(self, plans: list[InstructionPlan]) -> list[str]:
        """Instructions for `plans`, in order, at most max_concurrency requests at a time."""
        with ThreadPoolExecutor(max_workers=self.llm.max_concurrency) as pool:
            return list(pool.map(self.write, plans))


def default_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.llm.cache_dir) if cfg.llm.cache_dir else Path(cfg.root).parent / "cache" / "llm_instructions"


def rewrite_cases(cases: list[Case], cfg: DataConfig, writer: OpenAIWriter | None = None) -> list[Case]:
    """Cases with their planned instructions rewritten by the LLM (cases without a plan are kept)."""
    writer = writer or OpenAIWriter(cfg.llm, default_cache_dir(cfg))
    planned = [i for i, c in enumerate(cases) if "plan" in c.meta]
    texts = writer.write_many([InstructionPlan.from_dict(cases[i].meta["plan"]) for i in planned])
    out = list(cases)
    for i, text in zip(planned, texts):
        c = cases[i]
        out[i] = replace(c, instruction=text, meta=c.meta | {"instruction_writer": f"openai:{cfg.llm.model}", "template_instruction": c.instruction})
    return out
