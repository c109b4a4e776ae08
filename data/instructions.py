"""Instruction construction: Scone's two-step decoupling, in a closed vocabulary.

Step 1 (subject identification): each subject gets a referring phrase built from attribute, position and
size cues, only as many as needed to be unique among the candidates of its reference image.
Step 2 (instruction writing): the instruction is written from those phrases and the target layout alone,
never from the images, so it cannot leak a distractor or mix up image indices.

The text is lowercase words separated by single spaces; ',' is a word of its own. `VOCABULARY` lists
every word any instruction, phrase, qa question or SRUM prompt can contain (the model's word-level
tokenizer is built from it).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, SCENES, SIZES, TEXTURES, Subject

CUE_KEYS = ("colour", "texture", "size", "position")  # category is always named (it is the noun)

# Slot names of every layout (data.world.LAYOUTS) and how they read.
REFERENCE_POSITIONS = (
    "left", "middle", "right", "top left", "top right", "bottom left", "bottom right", "top", "bottom", "bottom middle"
)
TARGET_POSITION_PHRASES = {
    "center": "in the middle",
    "left": "on the left",
    "middle": "in the middle",
    "right": "on the right",
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
    "top": "at the top",
    "bottom": "at the bottom",
    "bottom middle": "at the bottom middle",
}
BACKGROUND_PHRASES = {
    "beach": "at the beach",
    "forest": "in the forest",
    "city": "in the city",
    "night": "at night",
    "snow": "in the snow",
}
MAX_IMAGES = 5  # MICo's five-input composition types
MAX_INSTRUCTION_WORDS = 44  # the tiny model reads 48 text tokens; leave room for special tokens
VERBS = ("place", "put", "show", "draw")
SOURCE_LINKS = ("from image {k}", "in image {k}", "of image {k}")
SCENE_LINKS = ("in the scene from image {k}", "with the background of image {k}", "in the setting of image {k}")
INSTRUCTION_TEMPLATES = (
    "{verb} {mentions} {background}",
    "{background} , {verb} {mentions}",
    "create a picture of {mentions} {background}",
)
QA_TEMPLATES = ("is there {desc}", "is {desc} {position}", "is this {background}")
# Understanding questions (data.understanding): what the scene graph says, asked in one-word and yes / no forms and
# answered by a short caption. The yes / no forms of presence, position and scene are QA_TEMPLATES, as the self
# judge asks them; {ref} is a referring phrase ("the red one", "the circle on the left"), {noun} a plural.
UNDERSTANDING_TEMPLATES = {
    "colour": "what colour is {ref}",
    "colour_yes_no": "is {ref} {colour}",
    "shape": "what is {ref}",
    "shape_yes_no": "is {ref} a {category}",
    "texture": "what pattern is {ref}",
    "texture_yes_no": "is {ref} {texture}",
    "count": "how many {noun} are there",
    "count_yes_no": "are there {number} {noun}",
    "position": "where is {ref}",
    "scene": "what place is this",
    "caption": "describe the image",
}
UNDERSTANDING_WORDS = ("zero", "things", "one")  # a count of none; the noun of every subject; "the red one"
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {c: f"{c}s" for c in (*OBJECT_CATEGORIES, *CHARACTER_CATEGORIES)} | {"person": "people"}
T2I_RELATIONS = {  # SRUM prompts: spatial relation phrase -> (slot of the first subject, slot of the second)
    "on the left of": ("left", "right"),
    "on the right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
T2I_COMPANIONS = ("next to", "near", "with")  # non-spatial pairing words; the layout is not specified by them
STYLE_CHOICES = len(VERBS) * len(SOURCE_LINKS) * len(INSTRUCTION_TEMPLATES) * len(SCENE_LINKS)
T2I_TEMPLATES = ("{subjects} {background}", "a picture of {subjects} {background}")
# MIGE multimodal instructions: each placeholder stands for the next input image, in order.
IMAGE_PLACEHOLDER = "<imagehere>"
EDIT_TEMPLATES = {
    "addition": "add <imagehere> {position} of <imagehere>",  # subject, then the source scene
    "replacement": "replace {phrase} in <imagehere> with <imagehere>",  # source scene, then the subject
}


@dataclass(frozen=True)
class Mention:
    """One subject named by the instruction: which reference it comes from, how it is referred to, where it goes."""

    image: int  # 1-based reference index
    domain: str
    cues: dict  # {"category": ..., optional "colour" / "texture" / "size" / "position" (reference slot)}
    slot: str  # target slot in the plan's layout

    @property
    def phrase(self) -> str:
        return referring_phrase(self.cues, self.domain)


@dataclass(frozen=True)
class InstructionPlan:
    """Everything the instruction must convey; the target scene graph follows from it exactly."""

    mentions: tuple[Mention, ...]
    layout: str  # data.world.LAYOUTS key of the target
    background: str
    scene_image: int | None = None  # 1-based index of a scene-only reference giving the background
    style: int = 0  # template choices, drawn once so rewriting with new phrases keeps the wording

    def to_dict(self) -> dict:
        """Plain JSON types (lists, not tuples), so a stored plan compares equal to a fresh one."""
        d = asdict(self)
        d["mentions"] = [dict(m) for m in d["mentions"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InstructionPlan":
        return cls(
            mentions=tuple(Mention(**m) for m in d["mentions"]),
            layout=d["layout"],
            background=d["background"],
            scene_image=d.get("scene_image"),
            style=int(d.get("style", 0)),
        )

    def with_cues(self, image: int, cues: dict) -> "InstructionPlan":
        """The same plan with the mention from `image` referred to by new cues (multi-candidate rewrite)."""
        mentions = tuple(
            Mention(m.image, m.domain, dict(cues), m.slot) if m.image == image else m for m in self.mentions
        )
        return InstructionPlan(mentions, self.layout, self.background, self.scene_image, self.style)


# ---------------------------------------------------------------- step 1: referring phrases


def referring_phrase(cues: dict, domain: str) -> str:
    """'the small left striped red circle' / 'the left person in red': attribute words around the noun."""
    words = ["the"]
    for key in ("size", "position", "texture"):
        if cues.get(key):
            words.append(cues[key])
    if domain == "character":
        words.append(cues["category"])
        if cues.get("colour"):
            words += ["in", cues["colour"]]
    else:
        if cues.get("colour"):
            words.append(cues["colour"])
        words.append(cues["category"])
    return " ".join(words)


def describe(subject: Subject, article: str = "a") -> str:
    """Attribute description without position: 'a striped red circle', 'a robot in striped blue'."""
    tex = [] if subject.texture == "plain" else [subject.texture]
    if subject.domain == "character":
        words = [subject.category, "in", *tex, subject.colour]
    else:
        words = [*tex, subject.colour, subject.category]
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join([article, *words])


def cue_value(subject: Subject, slot: str, key: str) -> str:
    return slot if key == "position" else getattr(subject, key)


def cues_match(cues: dict, subject: Subject, slot: str) -> bool:
    """Whether a candidate (subject at reference slot) fits every cue of a phrase."""
    if cues["category"] != subject.category:
        return False
    return all(cues[k] == cue_value(subject, slot, k) for k in CUE_KEYS if k in cues)


def unique_cues(
    candidates: list[tuple[Subject, str]], target: int, rng: np.random.Generator, extra_colour: float = 0.0
) -> dict:
    """Step 1: the fewest cues that single out candidates[target] among all candidates of one image.

    Among equally short cue sets one is drawn with `rng` (so phrases vary between colour, texture, size
    and position). A lone candidate is named by its category; `extra_colour` is the chance of adding its
    colour anyway (descriptive, as real instructions often are).
    """
    subject, slot = candidates[target]
    keys = [k for k in CUE_KEYS if k != "position" or len(candidates) > 1]
    for n in range(len(keys) + 1):
        fitting = []
        for combo in itertools.combinations(keys, n):
            cues = {"category": subject.category} | {k: cue_value(subject, slot, k) for k in combo}
            if sum(cues_match(cues, s, p) for s, p in candidates) == 1:
                fitting.append(cues)
        if fitting:
            cues = fitting[int(rng.integers(len(fitting)))]
            if len(candidates) == 1 and rng.random() < extra_colour:
                cues["colour"] = subject.colour
            return cues
    raise ValueError(f"candidate {subject.uid} cannot be told apart from the others in its image: {candidates}")


# ---------------------------------------------------------------- step 2: the instruction


class Writer(Protocol):
    """Writes the instruction from the plan alone (step 2). An LLM-backed writer implements the same call."""

    def write(self, plan: InstructionPlan) -> str: ...


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return " , ".join(items[:-1]) + " and " + items[-1]


@dataclass
class TemplateWriter:
    """Deterministic template writer: all wording choices come from `plan.style`."""

    name: str = field(default="template", init=False)

    def write(self, plan: InstructionPlan) -> str:
        if not plan.mentions:
            raise ValueError("an instruction needs at least one subject mention")
        style = plan.style
        verb = VERBS[style % len(VERBS)]
        style //= len(VERBS)
        link = SOURCE_LINKS[style % len(SOURCE_LINKS)]
        style //= len(SOURCE_LINKS)
        template = INSTRUCTION_TEMPLATES[style % len(INSTRUCTION_TEMPLATES)]
        style //= len(INSTRUCTION_TEMPLATES)
        if plan.scene_image is not None:
            background = SCENE_LINKS[style % len(SCENE_LINKS)].format(k=plan.scene_image)
        else:
            background = BACKGROUND_PHRASES[plan.background]
        items = []
        for m in plan.mentions:
            text = f"{m.phrase} {link.format(k=m.image)}"
            if plan.layout != "single":  # a lone subject always goes to the middle: nothing to say
                text += f" {TARGET_POSITION_PHRASES[m.slot]}"
            items.append(text)
        return template.format(verb=verb, mentions=_join(items), background=background)


def word_count(text: str) -> int:
    return len(text.split())


def fit_style(plan: InstructionPlan, writer: Writer, limit: int = MAX_INSTRUCTION_WORDS) -> InstructionPlan:
    """The plan with the first wording choice (from its own style on) whose instruction fits `limit` words.

    Long multi-subject instructions would be cut by the model's text window; a shorter template keeps
    every phrase intact. When nothing fits, the shortest wording is returned.
    """
    best = None
    for k in range(STYLE_CHOICES):
        candidate = dataclasses.replace(plan, style=plan.style + k)
        n = word_count(writer.write(candidate))
        if n <= limit:
            return candidate
        if best is None or n < best[0]:
            best = (n, candidate)
    return best[1]


def get_writer(kind: str) -> Writer:
    """The plan-to-text writer used while drawing cases. The LLM writer (`openai`) needs an endpoint and a
    cache: data.llm_writer.OpenAIWriter, applied after drawing by data.build."""
    if kind == "template":
        return TemplateWriter()
    raise ValueError(
        f"instruction writer {kind!r} is not a drawing writer; use data.llm_writer.OpenAIWriter for 'openai', "
        "or set data.instruction_writer=template"
    )


# ---------------------------------------------------------------- qa and text-to-image prompts


def qa_there(subject: Subject) -> str:
    return QA_TEMPLATES[0].format(desc=describe(subject))


def qa_position(subject: Subject, slot: str) -> str:
    return QA_TEMPLATES[1].format(desc=describe(subject, "the"), position=TARGET_POSITION_PHRASES[slot])


def qa_background(background: str) -> str:
    return QA_TEMPLATES[2].format(background=BACKGROUND_PHRASES[background])


def counted(subject: Subject, n: int) -> str:
    """'two striped red circles' (numeracy prompts); n == 1 gives 'a ...'."""
    if n == 1:
        return describe(subject)
    words = describe(subject).split()[1:]
    noun_at = words.index(subject.category)
    words[noun_at] = PLURALS[subject.category]
    return " ".join([NUMBER_WORDS[n], *words])


def t2i_prompt(subjects_text: str, background: str, style: int = 0) -> str:
    return T2I_TEMPLATES[style % len(T2I_TEMPLATES)].format(
        subjects=subjects_text, background=BACKGROUND_PHRASES[background]
    )


def edit_instruction(edit_type: str, *, slot: str | None = None, phrase: str | None = None) -> str:
    """MIGE-style multimodal instruction: 'add <imagehere> on the left of <imagehere>'."""
    if edit_type == "addition":
        return EDIT_TEMPLATES["addition"].format(position=TARGET_POSITION_PHRASES[slot])
    if edit_type == "replacement":
        return EDIT_TEMPLATES["replacement"].format(phrase=phrase)
    raise ValueError(f"unknown edit type {edit_type!r}; expected one of {tuple(EDIT_TEMPLATES)}")


def _words(*texts: str) -> set[str]:
    out: set[str] = set()
    for t in texts:
        out.update(w for w in t.split() if not (w.startswith("{") and w.endswith("}")))
    return out


def _vocabulary() -> list[str]:
    words = _words(
        *REFERENCE_POSITIONS,
        *TARGET_POSITION_PHRASES.values(),
        *BACKGROUND_PHRASES.values(),
        *VERBS,
        *(s.replace("{k}", "") for s in SOURCE_LINKS + SCENE_LINKS),
        *INSTRUCTION_TEMPLATES,
        *QA_TEMPLATES,
        *UNDERSTANDING_TEMPLATES.values(),
        *UNDERSTANDING_WORDS,
        *NUMBER_WORDS.values(),
        *PLURALS.values(),
        *T2I_RELATIONS,
        *T2I_COMPANIONS,
        *T2I_TEMPLATES,
        *EDIT_TEMPLATES.values(),
        *OBJECT_CATEGORIES,
        *CHARACTER_CATEGORIES,
        *COLOURS,
        *TEXTURES,
        *SIZES,
        *SCENES,
    )
    words |= {"the", "a", "an", "in", "and", ",", "yes", "no"}
    words |= {str(k) for k in range(1, MAX_IMAGES + 1)}
    return sorted(words)


VOCABULARY: list[str] = _vocabulary()
