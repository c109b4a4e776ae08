"""Row-level quality: structural checks (quarantine) and the 0-4 consistency judge (refined subset).

Scone filters its refined single-candidate data by having a VLM score subject consistency and
instruction following from 0 to 4 and keeping only 4s. Here the judge reads the exact scene graphs:
what the instruction's plan requires (resolved against the reference scene graphs) versus what the
target holds. The judge is pluggable (`ConsistencyJudge`), so a VLM-backed one can replace it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from data.instructions import InstructionPlan, cues_match, referring_phrase
from data.records import ALL_TASK_TYPES, Case
from data.render import visible_fraction
from data.world import slot_bbox, slot_of

MIN_VISIBLE_FRACTION = 0.5  # a candidate hidden more than this cannot be identified in its image


def check_case(case: Case) -> list[str]:
    """Problems that make a row unusable (empty list = fine). Rows with problems are quarantined."""
    problems: list[str] = []
    if case.task_type not in ALL_TASK_TYPES:
        problems.append(f"unknown task_type {case.task_type!r}")
    if not case.instruction or not case.instruction.strip():
        problems.append("empty instruction")
    if len(case.subject_list) != len(case.references) or len(case.subject_label) != len(case.references):
        problems.append(
            f"{len(case.references)} references but {len(case.subject_list)} subject lists "
            f"and {len(case.subject_label)} label lists"
        )
        return problems
    source = case.meta.get("source_image")  # an edit's source scene is a canvas, not a pool of candidates
    for i, (ref, phrases, labels) in enumerate(zip(case.references, case.subject_list, case.subject_label)):
        if i == source:
            continue
        if len(phrases) != len(ref.placements) or len(labels) != len(ref.placements):
            problems.append(f"reference {i + 1}: {len(ref.placements)} candidates, {len(phrases)} phrases, {len(labels)} labels")
            continue
        if len(set(phrases)) != len(phrases):
            problems.append(f"reference {i + 1}: phrases are not unique: {phrases}")
        for j in range(len(ref.placements)):
            if visible_fraction(ref, j) < MIN_VISIBLE_FRACTION:
                problems.append(f"reference {i + 1}: candidate {j} ({phrases[j]}) is mostly hidden")
    colours = [p.subject.colour for r in case.references for p in r.placements]
    if len(set(colours)) != len(colours):
        problems.append(f"subjects share a colour: {colours}")
    for k in range(len(case.target.placements)):
        if visible_fraction(case.target, k) < MIN_VISIBLE_FRACTION:
            problems.append(f"target: subject {k} is mostly hidden")
    return problems


class ConsistencyJudge(Protocol):
    def score(self, case: Case) -> tuple[int, list[str]]:
        """0-4 score of the target against the references and instruction, with the reasons for lost points."""
        ...


@dataclass
class SceneGraphJudge:
    """Ground-truth judge: one point each for presence, subject consistency, layout, and scene.

    - presence: every subject the instruction asks for appears in the target;
    - consistency: each of them keeps the category, colour, texture and size it has in its reference;
    - layout: each sits at the position the instruction names;
    - scene: the background is the one asked for and nothing unrequested appears.
    """

    name: str = "scene_graph"

    def required(self, case: Case) -> tuple[InstructionPlan, list]:
        """The plan and, per mention, the reference subject its phrase resolves to."""
        if "plan" not in case.meta:
            raise ValueError(f"case {case.key}: no instruction plan in meta; the scene-graph judge needs it")
        plan = InstructionPlan.from_dict(case.meta["plan"])
        subjects = []
        for m in plan.mentions:
            ref = case.references[m.image - 1]
            hits = [p.subject for j, p in enumerate(ref.placements) if cues_match(m.cues, p.subject, slot_of(ref, j))]
            if len(hits) != 1:
                raise ValueError(
                    f"case {case.key}: phrase {referring_phrase(m.cues, m.domain)!r} matches {len(hits)} subjects of image {m.image}"
                )
            subjects.append(hits[0])
        return plan, subjects

    def score(self, case: Case) -> tuple[int, list[str]]:
        plan, wanted = self.required(case)
        target = case.target
        placed = {p.subject.uid: p for p in target.placements}
        reasons = []
        missing = [s for s in wanted if s.uid not in placed]
        if missing:
            reasons.append("missing: " + ", ".join(s.name for s in missing))
        changed = [
            s for s in wanted
            if s.uid in placed and placed[s.uid].subject != s
        ]
        if changed:
            reasons.append("changed: " + ", ".join(f"{s.name} -> {placed[s.uid].subject.name}" for s in changed))
        misplaced = [
            s for s, m in zip(wanted, plan.mentions)
            if s.uid in placed and tuple(placed[s.uid].bbox) != slot_bbox(plan.layout, m.slot, s.size, target.size)
        ]
        if misplaced:
            reasons.append("misplaced: " + ", ".join(s.name for s in misplaced))
        extra = [p.subject for p in target.placements if p.subject.uid not in {s.uid for s in wanted}]
        if extra:
            reasons.append("unrequested: " + ", ".join(s.name for s in extra))
        background = case.references[plan.scene_image - 1].background if plan.scene_image else plan.background
        if target.background != background:
            reasons.append(f"background {target.background} instead of {background}")
        lost = bool(missing) + bool(changed) + bool(misplaced) + bool(extra or target.background != background)
        return 4 - lost, reasons


def get_judge(kind: str = "scene_graph") -> ConsistencyJudge:
    if kind == "scene_graph":
        return SceneGraphJudge()
    raise ValueError(f"unknown refinement judge {kind!r}; available: scene_graph")
