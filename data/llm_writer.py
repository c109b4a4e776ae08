"""Scone step 2 written by an LLM: any OpenAI-compatible chat endpoint (`data.instruction_writer: openai`).

The LLM sees only what the instruction must convey, the referring phrases from step 1 with their image
numbers, target positions and the background, never the images, so it cannot name a distractor or mix up
images (Scone Sec. 4.2). The requests go through the project's one client (data.openai_client, the judges'
too): answers cached on disk (one per prompt: model + messages + sampling parameters), all of a build in
flight together (at most data.llm.max_concurrency at once), retried with exponential backoff on transport
errors, 429 and 5xx. An answer that drops or changes a phrase, names a subject it was not given, or leaves the
word list the tokenizer knows is unusable: asked again like a failed request, then an error (LLMWriterError)
naming the problems and the prompt, never silently replaced by the template.
"""
from __future__ import annotations

import re
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
from data.openai_client import AnswerError, ChatClient, EndpointConfig, EndpointConfigError, Request, RequestError
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


class InstructionAnswerError(AnswerError):
    """An answer that breaks the instruction rules (the client asks again, then raises it)."""


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


def endpoint_config(llm: LLMWriterConfig, cache_dir: str | Path) -> EndpointConfig:
    """data.llm's settings as the shared client's (one answer cache per build root)."""
    return EndpointConfig(model=llm.model, base_url=llm.base_url, concurrency=llm.max_concurrency,
                          max_retries=llm.max_retries, timeout_s=llm.timeout_s, backoff_s=llm.backoff_s,
                          temperature=llm.temperature, cache=True, cache_dir=str(cache_dir))


@dataclass
class OpenAIWriter:
    """Writer (data.instructions.Writer) backed by an OpenAI-compatible endpoint through data.openai_client."""

    llm: LLMWriterConfig
    cache_dir: Path
    client: ChatClient | None = None

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        if self.client is None:
            try:
                self.client = ChatClient(endpoint_config(self.llm, self.cache_dir), api_key_env=self.llm.api_key_env)
            except EndpointConfigError as e:
                raise LLMWriterError(f"instruction_writer=openai: {e}; or set data.instruction_writer=template") from None

    def request(self, plan: InstructionPlan) -> Request:
        prompt = build_prompt(plan)
        what = f"instruction for {', '.join(m.phrase for m in plan.mentions)}"

        def parse(raw: str | None) -> str:
            text = normalise(raw or "")
            problems = check_instruction(text, plan)
            if problems:
                raise InstructionAnswerError(f"instruction LLM {self.llm.model} answered {raw!r}: {'; '.join(problems)}. "
                                             f"Prompt:\n{prompt}")
            return text

        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return Request("data.llm", "instruction", what, messages, parse, repeat=False)

    def write(self, plan: InstructionPlan) -> str:
        return self.write_many([plan])[0]

    def write_many(self, plans: list[InstructionPlan]) -> list[str]:
        """Instructions for `plans`, in order, at most max_concurrency requests at a time."""
        try:
            return self.client.ask([self.request(p) for p in plans])
        except (AnswerError, RequestError) as e:
            raise LLMWriterError(f"{e}\nUse a stronger model, or data.instruction_writer=template") from e


def default_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.llm.cache_dir) if cfg.llm.cache_dir else Path(cfg.root).parent / "cache" / "llm_instructions"


def rewrite_cases(cases: list[Case], cfg: DataConfig, writer: OpenAIWriter | None = None) -> list[Case]:
    """Cases with their planned instructions rewritten by the LLM (cases without a plan are kept)."""
    own = writer is None
    writer = writer or OpenAIWriter(cfg.llm, default_cache_dir(cfg))
    planned = [i for i, c in enumerate(cases) if "plan" in c.meta]
    try:
        texts = writer.write_many([InstructionPlan.from_dict(cases[i].meta["plan"]) for i in planned])
    finally:
        if own:
            writer.client.close()
    out = list(cases)
    for i, text in zip(planned, texts):
        c = cases[i]
        out[i] = replace(c, instruction=text, meta=c.meta | {"instruction_writer": f"openai:{cfg.llm.model}", "template_instruction": c.instruction})
    return out
