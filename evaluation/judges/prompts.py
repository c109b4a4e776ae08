"""The `strict` judge protocol (eval.openai.protocol: strict): what a VLM judge is asked on SconeEval, and the
only answers it may give. The default protocol is the released scoring's (evaluation.judges.released); this one
is ours and stricter: a system message, every image labelled, the images at `eval.openai.image_size` with
nearest-neighbour resampling (pixel-exact blocks of the tiny renders), and the subject-consistency request
names the ground-truth target and distractor subjects. Scores it produces are not comparable with the
published leaderboard (docs/judges.md).

Three requests per the protocol (Scone Sec. 4.3), each asking for a short rationale and a value:

- prompt following (PF, 0-10): is the instruction carried out (subjects, count, layout, setting),
  leaving the identity of the subjects aside;
- subject consistency (SC, 0-10): are the *target* subjects (the candidates the instruction picks,
  `subject_label == 1`) the same ones as in their reference images; other candidates are ignored,
  which is where SconeEval departs from OmniContext's consistency prompt;
- presence (0 or 1): does the subject a phrase describes in reference image i appear in the
  generated image (the distinction question; presence only, not resemblance or composition).

The scoring guides follow VIEScore / OmniContext (0-10 with a rationale) and the SconeEval
distinction prompt, worded here in our own terms. Answers are one JSON object; `parse_answer` accepts
exactly that (optionally inside a ```json fence) and raises `JudgeAnswerError` with the raw text
otherwise: a judge never falls back to a default score. `JudgeAnswerError` and `unusable` (its message: the
case, the request, the problem and the raw answer) serve both protocols and the SRUM reward requests.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from data.openai_client import AnswerError

SYSTEM = (
    "You are a meticulous, strict evaluator of subject-driven image generation. You look carefully at every "
    "image you are given and answer with exactly the JSON object you are asked for, nothing else."
)


class JudgeAnswerError(AnswerError):
    """A judge's answer is not what its request asked for (the client retries it, then raises it)."""


class ScoreAnswer(BaseModel):
    """Answer to a 0-10 request (PF or SC)."""

    model_config = ConfigDict(extra="ignore")
    reason: str
    score: Annotated[StrictFloat, Field(ge=0, le=10, allow_inf_nan=False)]  # integers pass, strings and booleans do not


class PresenceAnswer(BaseModel):
    """Answer to a presence request."""

    model_config = ConfigDict(extra="ignore")
    reason: str
    present: Annotated[StrictInt, Field(ge=0, le=1)]


SCORE_FORMAT = 'Answer with one JSON object and nothing else: {"reason": "<one to three sentences>", "score": <integer from 0 to 10>}'
PRESENCE_FORMAT = 'Answer with one JSON object and nothing else: {"reason": "<one or two sentences>", "present": <0 or 1>}'


def _references_note(n_refs: int) -> str:
    which = "image 1" if n_refs == 1 else ("images 1 and 2" if n_refs == 2 else f"images 1 to {n_refs}")
    return (
        f"You are shown {n_refs} input image{'s' if n_refs > 1 else ''} ({which}, in the order the instruction "
        "numbers them), then the generated image, which is the last one."
    )


def target_lines(case) -> list[str]:
    """What the instruction takes from each reference: its labelled candidates, or its setting when the
    reference shows no subject (a scene reference)."""
    lines = []
    for i, (phrases, labels) in enumerate(zip(case.subject_list, case.subject_label)):
        if not phrases:
            lines.append(f"- from image {i + 1}: its setting (the scene / background)")
            continue
        wanted = [p for p, y in zip(phrases, labels) if int(y) == 1]
        others = [p for p, y in zip(phrases, labels) if int(y) != 1]
        if wanted:
            text = f"- from image {i + 1}: " + "; ".join(f'"{p}"' for p in wanted)
            if others:
                text += " (not " + ", ".join(f'"{p}"' for p in others) + ", which must be ignored)"
            lines.append(text)
    return lines


def prompt_following(case) -> str:
    return "\n".join([
        _references_note(len(case.subject_list)),
        f'Instruction: "{case.instruction}"',
        "",
        "Rate how well the generated image carries out the instruction, from 0 to 10.",
        "Look only at instruction following: are the requested subjects there, each once, and no subject that "
        "was not asked for; are they arranged and placed as the instruction says; is the setting the requested "
        "one. Do not judge whether a subject looks exactly like the one in its input image (that is scored "
        "separately), and do not judge beauty or image quality.",
        "Scoring guide:",
        "- 9 to 10: everything the instruction asks for is there and arranged as asked; nothing unrequested.",
        "- 6 to 8: the main request is met, with minor slips (a position slightly off, a small extra detail).",
        "- 3 to 5: only part of the request is met: a requested subject is missing, an unrequested subject "
        "appears, or the arrangement or setting clearly differs from the instruction.",
        "- 1 to 2: the image is only loosely related to the instruction.",
        "- 0: the image does not follow the instruction at all (blank, noise, unrelated content).",
        "Go through the requested elements one by one before you decide.",
        SCORE_FORMAT,
    ])


def subject_consistency(case) -> str:
    return "\n".join([
        _references_note(len(case.subject_list)),
        f'Instruction: "{case.instruction}"',
        "The target subjects, the only ones to compare, are:",
        *target_lines(case),
        "",
        "Rate how faithfully the generated image preserves the identity of these target subjects, from 0 to 10.",
        "Compare each target in the generated image with its appearance in its input image: kind and shape, "
        "colour, texture or pattern, proportions and distinctive details (for a setting: its colours and "
        "layout). Other subjects of the input images are distractors: neither reward nor punish their "
        "appearance. Do not judge position, count or other instruction following, nor image quality. A target "
        "that is missing from the generated image counts as not preserved.",
        "Scoring guide:",
        "- 9 to 10: every target is unmistakably the same as in its input image.",
        "- 6 to 8: every target is recognisably the same, with small differences (a slightly different shade, "
        "a pattern detail, proportions).",
        "- 3 to 5: identity is only partly kept: a target is lost or replaced by another subject, or clearly "
        "changed in colour, texture or shape.",
        "- 1 to 2: the targets barely resemble their input images.",
        "- 0: no target subject can be recognised.",
        "Go through the targets one by one before you decide.",
        SCORE_FORMAT,
    ])


def presence(case, ref_index: int, phrase: str) -> str:
    return "\n".join([
        "You are shown two images: first a reference image, then a target image.",
        f'Subject description: "{phrase}" (it describes a subject of the reference image; a position word '
        "such as left or right means its position in the reference image).",
        "",
        "Decide whether this subject of the reference image appears in the target image.",
        "1. Find the subject the description singles out in the reference image.",
        "2. Look for that same subject in the target image. Judge presence only, not how closely it resembles "
        "the reference and not whether it is placed or composed as an instruction would want.",
        "- present = 1 when the subject can clearly be identified in the target image;",
        "- present = 0 when it cannot (absent, or only another subject of the reference image is there).",
        PRESENCE_FORMAT,
    ])


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def parse_answer(raw: str | None, schema: type[BaseModel], *, case_key: str, what: str) -> Any:
    """The validated answer, or JudgeAnswerError naming the case and showing the raw text."""
    text = (raw or "").strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise JudgeAnswerError(unusable(case_key, what, raw, f"not JSON ({e.msg} at char {e.pos})")) from None
    return validate(data, schema, raw, case_key=case_key, what=what)


def validate(data: Any, schema: type[BaseModel], raw: str | None, *, case_key: str, what: str) -> Any:
    """`data` (a decoded answer) as `schema`, or JudgeAnswerError naming each problem."""
    if not isinstance(data, dict):
        raise JudgeAnswerError(unusable(case_key, what, raw, f"expected a JSON object, got {type(data).__name__}"))
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'answer'}: {err['msg']}" for err in e.errors())
        raise JudgeAnswerError(unusable(case_key, what, raw, problems)) from None


def unusable(case_key: str, what: str, raw: str | None, problem: str) -> str:
    shown = raw if raw is None or len(raw) <= 2000 else raw[:2000] + f"... ({len(raw)} chars)"
    return f"case {case_key}: the judge's {what} answer is unusable: {problem}\nraw answer: {shown!r}"
