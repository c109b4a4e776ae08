"""Deterministic sampling of the subject world: subjects, layouts and the six SconeEval case kinds.

Every dataset draws from its own random stream (seed + stream name) and its own uid namespace. The
held-out benchmark also draws from a disjoint set of (category, colour, texture) combinations, so no
benchmark subject was ever seen in training, not even as a look-alike.

Over 400 lines on purpose: the subject world's sampler, its defect injection and its QA are one model of the world;
split, each part would re-derive the others' invariants.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from data.config import DataConfig
from data.instructions import (
    MAX_INSTRUCTION_WORDS,
    InstructionPlan,
    Mention,
    Writer,
    cues_match,
    describe,
    fit_style,
    get_writer,
    qa_background,
    qa_position,
    qa_there,
    referring_phrase,
    unique_cues,
    word_count,
)
from data.records import Case, case_type_of
from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, SCENES, SIZES, TEXTURES, Placement, Scene, Subject

CATEGORIES = (*OBJECT_CATEGORIES, *CHARACTER_CATEGORIES)
SIZE_FRACTION = {"small": 0.28, "large": 0.42}  # subject box side / image side
# Slot centres as fractions of the image side; rows sit on the ground line, grids fill the frame.
LAYOUTS: dict[str, dict[str, tuple[float, float]]] = {
    "single": {"center": (0.5, 0.6)},
    "pair": {"left": (0.27, 0.6), "right": (0.73, 0.6)},
    "triple": {"left": (1 / 6, 0.6), "middle": (0.5, 0.6), "right": (5 / 6, 0.6)},
    "grid": {"top left": (0.27, 0.3), "top right": (0.73, 0.3), "bottom left": (0.27, 0.74), "bottom right": (0.73, 0.74)},
    "column": {"top": (0.5, 0.3), "bottom": (0.5, 0.74)},
    # five subjects (MICo's 5O, 1P4C, 1P2C2O): two on top, three on a lower ground line
    "five": {
        "top left": (0.27, 0.3),
        "top right": (0.73, 0.3),
        "bottom left": (1 / 6, 0.78),
        "bottom middle": (0.5, 0.78),
        "bottom right": (5 / 6, 0.78),
    },
}
ROW_LAYOUT = {1: "single", 2: "pair", 3: "triple", 4: "grid", 5: "five"}  # layout used for n subjects in one image
MAX_SUBJECTS_PER_CASE = len(COLOURS)  # subjects of one case never share a colour (the oracle tells them apart by it)
CHARACTER_SHARE = 0.4
SCENE_REFERENCE_SHARE = 0.35
EXTRA_COLOUR_SHARE = 0.3
DEFECTS = ("wrong_colour", "missing_subject", "wrong_position")


def domain_of(category: str) -> str:
    if category in OBJECT_CATEGORIES:
        return "object"
    if category in CHARACTER_CATEGORIES:
        return "character"
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def is_held_out(category: str, colour: str, texture: str) -> bool:
    """A fixed quarter of all (category, colour, texture) combinations is reserved for the benchmark.

    The rule keeps, for every category, six held-out colours (enough for intra-category distinction)
    while every category keeps every colour in training (at least two textures each).
    """
    ci, k, t = CATEGORIES.index(category), list(COLOURS).index(colour), TEXTURES.index(texture)
    return (ci + k + t) % 4 == 0


ALL_COMBOS = tuple((c, k, t) for c in CATEGORIES for k in COLOURS for t in TEXTURES)
HELD_OUT_COMBOS = tuple(x for x in ALL_COMBOS if is_held_out(*x))
TRAIN_COMBOS = tuple(x for x in ALL_COMBOS if not is_held_out(*x))


def box_side(size: str, image_size: int) -> int:
    if size not in SIZE_FRACTION:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    return max(3, round(SIZE_FRACTION[size] * image_size))


def slot_bbox(layout: str, slot: str, size: str, image_size: int) -> tuple[int, int, int, int]:
    """Pixel box of a subject of `size` at `slot` of `layout`, shifted inside the canvas if needed."""
    try:
        fx, fy = LAYOUTS[layout][slot]
    except KeyError:
        raise ValueError(f"no slot {slot!r} in layout {layout!r}; layouts: {LAYOUTS}") from None
    side = box_side(size, image_size)
    x0 = min(max(round(fx * image_size - side / 2), 0), image_size - side)
    y0 = min(max(round(fy * image_size - side / 2), 0), image_size - side)
    return (x0, y0, x0 + side, y0 + side)


def slot_of(scene: Scene, i: int) -> str:
    """Slot name of placement i, read back from its box (the row layout for the scene's count first)."""
    p = scene.placements[i]
    preferred = ROW_LAYOUT.get(len(scene.placements))
    for layout in ([preferred] if preferred else []) + list(LAYOUTS):
        for slot in LAYOUTS[layout]:
            if slot_bbox(layout, slot, p.subject.size, scene.size) == tuple(p.bbox):
                return slot
    raise ValueError(f"placement {i} bbox {p.bbox} is at no layout slot of a {scene.size}px image")


def layout_scene(background: str, subjects: list[Subject], slots: list[str], layout: str, size: int) -> Scene:
    return Scene(
        background=background,
        placements=tuple(Placement(s, slot_bbox(layout, slot, s.size, size)) for s, slot in zip(subjects, slots)),
        size=size,
    )


def stream_seed(seed: int, stream: str) -> np.random.SeedSequence:
    """Independent, reproducible stream per (seed, dataset): adding a dataset never shifts another."""
    return np.random.SeedSequence([int(seed), zlib.crc32(stream.encode())])


class Exhausted(Exception):
    """No combination satisfies the constraints of this draw; the caller redraws the whole case."""


class World:
    """Sampler of one dataset's subjects and cases.

    split: "train" draws from TRAIN_COMBOS, "heldout" from HELD_OUT_COMBOS.
    namespace: prefix of subject uids; datasets that must not share subjects use different ones.
    """

    def __init__(self, seed: int, stream: str, *, split: str, image_size: int, writer: Writer, namespace: str | None = None):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.rng = np.random.default_rng(stream_seed(seed, stream))
        self.combos = TRAIN_COMBOS if split == "train" else HELD_OUT_COMBOS
        self.namespace = namespace or stream
        self.image_size = image_size
        self.writer = writer
        self._uids = 0

    # ------------------------------------------------------------ subjects

    def pick(self, seq):
        """One element of `seq`, drawn from this world's stream."""
        return seq[int(self.rng.integers(len(seq)))]

    def subject(
        self,
        used_colours: set[str],
        *,
        category: str | None = None,
        exclude_categories: frozenset[str] | set[str] = frozenset(),
        textures: tuple[str, ...] = TEXTURES,
    ) -> Subject:
        pool = [
            x
            for x in self.combos
            if x[1] not in used_colours
            and (category is None or x[0] == category)
            and x[0] not in exclude_categories
            and x[2] in textures
        ]
        if not pool:
            raise Exhausted
        if category is None:
            cats = sorted({x[0] for x in pool}, key=CATEGORIES.index)
            chars = [c for c in cats if c in CHARACTER_CATEGORIES]
            objs = [c for c in cats if c in OBJECT_CATEGORIES]
            use_chars = chars and (not objs or self.rng.random() < CHARACTER_SHARE)
            category = self.pick(chars if use_chars else objs)
            pool = [x for x in pool if x[0] == category]
        cat, colour, texture = self.pick(pool)
        size = self.pick(SIZES)
        uid = f"{self.namespace}-{self._uids:06d}"
        self._uids += 1
        return Subject(uid=uid, domain=domain_of(cat), category=cat, colour=colour, texture=texture, size=size)

    def permutation(self, items: list) -> list:
        return [items[i] for i in self.rng.permutation(len(items))]

    # ------------------------------------------------------------ single-candidate composition

    def composition_case(self, key: str, n_subjects: int, with_scene: bool) -> Case:
        """Single-candidate references (one subject each, optionally a scene last); target composes all."""
        for _ in range(100):
            try:
                return self._composition_case(key, n_subjects, with_scene)
            except Exhausted:
                continue
        raise RuntimeError(f"could not draw a composition case with {n_subjects} subjects from {len(self.combos)} combos")

    def _composition_case(self, key: str, n_subjects: int, with_scene: bool) -> Case:
        if not 1 <= n_subjects <= 4:
            raise ValueError(f"n_subjects must be 1..4, got {n_subjects}")
        used: set[str] = set()
        subjects = []
        for _ in range(n_subjects):
            s = self.subject(used)
            used.add(s.colour)
            subjects.append(s)
        size = self.image_size
        refs = [layout_scene(self.pick(list(SCENES)), [s], ["center"], "single", size) for s in subjects]
        scene_image = None
        background = self.pick(list(SCENES))
        if with_scene:
            refs.append(Scene(background=background, placements=(), size=size))
            scene_image = len(refs)
        layout = ROW_LAYOUT[n_subjects]
        slots = self.permutation(list(LAYOUTS[layout]))[:n_subjects]
        mentions = []
        for i, s in enumerate(subjects):
            cues = unique_cues([(s, "center")], 0, self.rng, extra_colour=EXTRA_COLOUR_SHARE)
            mentions.append(Mention(image=i + 1, domain=s.domain, cues=cues, slot=slots[i]))
        plan = InstructionPlan(tuple(mentions), layout, background, scene_image, int(self.rng.integers(1_000_000)))
        if word_count(self.writer.write(plan)) > MAX_INSTRUCTION_WORDS:  # descriptive extras go first
            plan = dataclasses.replace(plan, mentions=tuple(dataclasses.replace(m, cues={"category": m.cues["category"]}) for m in mentions))
            mentions = list(plan.mentions)
        plan = fit_style(plan, self.writer)
        target = layout_scene(background, subjects, slots, layout, size)
        task = "composition_single" if n_subjects == 1 else "composition_multi"
        case = Case(
            key=key,
            task_type=task,
            case_type=case_type_of([s.domain for s in subjects] + (["scene"] if with_scene else [])),
            instruction=self.writer.write(plan),
            references=refs,
            target=target,
            subject_list=[[m.phrase] for m in mentions] + ([[]] if with_scene else []),
            subject_label=[[1] for _ in mentions] + ([[]] if with_scene else []),
            meta={"plan": plan.to_dict()},
        )
        case.qa = self.qa(case)
        return case

    # ------------------------------------------------------------ multi-candidate references

    def add_candidates(self, case: Case, kind: str, extra: list[int]) -> Case:
        """Add `extra[i]` candidates to the i-th subject reference; the target is unchanged.

        kind "cross": added subjects differ in category from every other candidate of their image;
        "intra": they share the category of the referred subject, so the phrase needs more cues. The
        mention keeps its words when they still single the subject out (Scone reuses cross-category
        instructions) and is re-identified otherwise.
        """
        for _ in range(100):
            try:
                return self._add_candidates(case, kind, extra)
            except Exhausted:
                continue
        raise RuntimeError(f"case {case.key}: no room for {extra} extra {kind} candidates")

    def _add_candidates(self, case: Case, kind: str, extra: list[int]) -> Case:
        if kind not in ("cross", "intra"):
            raise ValueError(f"kind must be 'cross' or 'intra', got {kind!r}")
        plan = InstructionPlan.from_dict(case.meta["plan"])
        subject_refs = [i for i, r in enumerate(case.references) if r.placements]
        if len(extra) != len(subject_refs):
            raise ValueError(f"case {case.key}: {len(subject_refs)} subject references but extra={extra}")
        used = {p.subject.colour for r in case.references for p in r.placements}
        if len(used) + sum(extra) > MAX_SUBJECTS_PER_CASE:
            raise ValueError(f"case {case.key}: {len(used) + sum(extra)} subjects exceed {MAX_SUBJECTS_PER_CASE} colours")
        refs = list(case.references)
        subject_list = [list(x) for x in case.subject_list]
        subject_label = [list(x) for x in case.subject_label]
        for ref_i, n_extra in zip(subject_refs, extra):
            old = refs[ref_i]
            (chosen,) = [p.subject for p in old.placements]
            candidates = [chosen]
            for _ in range(n_extra):
                if kind == "intra":
                    s = self.subject(used, category=chosen.category)
                else:
                    s = self.subject(used, exclude_categories={c.category for c in candidates})
                used.add(s.colour)
                candidates.append(s)
            candidates = self.permutation(candidates)  # draw order decides who occludes whom
            layout = ROW_LAYOUT[len(candidates)]
            slots = self.permutation(list(LAYOUTS[layout]))[: len(candidates)]
            refs[ref_i] = layout_scene(old.background, candidates, slots, layout, old.size)
            pairs = list(zip(candidates, slots))
            target_j = candidates.index(chosen)
            mention = next(m for m in plan.mentions if m.image == ref_i + 1)
            cues = mention.cues
            if sum(cues_match(cues, s, slot) for s, slot in pairs) != 1:
                cues = unique_cues(pairs, target_j, self.rng)
                plan = plan.with_cues(ref_i + 1, cues)
            phrases = [
                referring_phrase(cues if j == target_j else unique_cues(pairs, j, self.rng), s.domain)
                for j, s in enumerate(candidates)
            ]
            subject_list[ref_i] = phrases
            subject_label[ref_i] = [int(j == target_j) for j in range(len(candidates))]
        n_subject_refs = len(subject_refs)
        task = f"distinction_{kind}" if n_subject_refs == 1 else f"distinction_composition_{kind}"
        plan = fit_style(plan, self.writer)
        meta = dict(case.meta) | {"plan": plan.to_dict(), "source_key": case.key, "candidates": kind}
        out = dataclasses.replace(
            case,
            task_type=task,
            instruction=self.writer.write(plan),
            references=refs,
            subject_list=subject_list,
            subject_label=subject_label,
            meta=meta,
        )
        out.qa = self.qa(out)
        return out

    # ------------------------------------------------------------ defects and qa

    def inject_defect(self, case: Case, defect: str) -> Case:
        """Spoil the target the way a generated pool is spoilt (recorded in meta['defect'])."""
        target = case.target
        placements = list(target.placements)
        if not placements:
            raise ValueError(f"case {case.key}: nothing to spoil in an empty target")
        i = int(self.rng.integers(len(placements)))
        if defect == "wrong_colour":
            old = placements[i].subject
            used = {p.subject.colour for r in case.references if r for p in r.placements}
            # the spoilt subject must stay inside this world's combos (never leak a held-out look-alike)
            free = [k for c, k, t in self.combos if c == old.category and t == old.texture and k not in used]
            if not free:
                raise ValueError(f"case {case.key}: no free colour to spoil {old.name}")
            new = dataclasses.replace(old, colour=self.pick(free))
            placements[i] = Placement(new, placements[i].bbox)
        elif defect == "missing_subject":
            del placements[i]
        elif defect == "wrong_position":
            if len(placements) == 1:
                s = placements[0].subject
                placements[0] = Placement(s, slot_bbox("pair", self.pick(["left", "right"]), s.size, target.size))
            else:
                j = (i + 1 + int(self.rng.integers(len(placements) - 1))) % len(placements)
                slots = [slot_of(target, k) for k in range(len(placements))]
                layout = ROW_LAYOUT[len(placements)]
                slots[i], slots[j] = slots[j], slots[i]
                placements = [Placement(p.subject, slot_bbox(layout, sl, p.subject.size, target.size)) for p, sl in zip(placements, slots)]
        else:
            raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECTS}")
        out = dataclasses.replace(case, target=dataclasses.replace(target, placements=tuple(placements)), meta=case.meta | {"defect": defect})
        out.qa = self.qa(out)
        return out

    def qa(self, case: Case, pairs: int = 2) -> list[tuple[str, str]]:
        """Balanced yes/no questions about the target image (trains and probes the understanding head)."""
        target = case.target
        present = {describe(p.subject) for p in target.placements}
        yes = [qa_background(target.background)]
        no = [qa_background(self.pick([b for b in SCENES if b != target.background]))]
        n_placed = len(target.placements)
        for k, p in enumerate(target.placements):
            yes.append(qa_there(p.subject))
            if n_placed > 1:
                slot = slot_of(target, k)
                yes.append(qa_position(p.subject, slot))
                elsewhere = [s for s in LAYOUTS[ROW_LAYOUT[n_placed]] if s != slot]
                no.append(qa_position(p.subject, self.pick(elsewhere)))
        # absent subjects: distractor candidates first (hard negatives), then wrong attribute bindings
        for r in case.references:
            for p in r.placements if r else ():
                if describe(p.subject) not in present:
                    no.append(qa_there(p.subject))
        for p in target.placements:
            other = self.pick([c for c in COLOURS if c != p.subject.colour])
            fake = dataclasses.replace(p.subject, colour=other)
            if describe(fake) not in present:
                no.append(qa_there(fake))
        n = min(pairs, len(yes), len(no))
        yes = [yes[i] for i in sorted(self.rng.choice(len(yes), n, replace=False))]
        no = [no[i] for i in sorted(self.rng.choice(len(no), n, replace=False))]
        return [pair for y, x in zip(yes, no) for pair in ((y, "yes"), (x, "no"))]

    # ------------------------------------------------------------ the six task types

    def case(self, key: str, task_type: str, max_references: int) -> Case:
        """One case of a SconeEval task type, within `max_references` input images."""
        if task_type in ("composition_single", "distinction_cross", "distinction_intra"):
            with_scene = max_references >= 2 and self.rng.random() < SCENE_REFERENCE_SHARE
            base = self.composition_case(key, 1, with_scene)
            if task_type == "composition_single":
                return base
            return self.add_candidates(base, task_type.split("_")[-1], [int(self.rng.integers(1, 3))])
        if max_references < 2:
            raise ValueError(f"{task_type} needs at least 2 references; data.max_references is {max_references}")
        if task_type == "composition_multi":
            n = int(self.rng.integers(2, min(4, max_references) + 1))
            with_scene = n < max_references and self.rng.random() < SCENE_REFERENCE_SHARE
            return self.composition_case(key, n, with_scene)
        if task_type in ("distinction_composition_cross", "distinction_composition_intra"):
            n = int(self.rng.integers(2, min(3, max_references) + 1))
            with_scene = n < max_references and self.rng.random() < SCENE_REFERENCE_SHARE
            base = self.composition_case(key, n, with_scene)
            extra = [1] * n
            extra[int(self.rng.integers(n))] += int(n == 2)  # 2 refs: one of them gets a third candidate
            return self.add_candidates(base, task_type.split("_")[-1], extra)
        raise ValueError(f"unknown task_type {task_type!r}")


def dataset_world(cfg: DataConfig, stream: str, split: str = "train") -> World:
    """The world a dataset (or any other stream, e.g. held-out prompts) draws its cases from, under a DataConfig:
    seeded by cfg.seed and the stream's name. Always the template writer while drawing: the cases must not depend
    on an LLM's answers (data.build rewrites instructions afterwards when data.instruction_writer says so)."""
    return World(cfg.seed, stream, split=split, image_size=cfg.image_size, writer=get_writer("template"))
