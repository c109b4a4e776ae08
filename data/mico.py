"""MICo-150K over the subject world: its seven sub-tasks, 27 composition types and the De&Re track.

MICo names entity types by letter; each maps onto a pool of world categories (the tiny world has no
garments or genders, so categories stand in for them and the instruction names them, as MICo states
gender explicitly):

    O  object            -> circle, square
    C  clothing / wear   -> triangle, diamond   (worn by the person: sized to fit it, see `compatibility`)
    P  person            -> person, robot       (either character kind; "gender" left to the draw)
    M  man               -> person
    W  woman             -> robot
    S  scene             -> a scene-only reference giving the background

Compose-by-Retrieval (MICo Sec. 3.2): after the primary subject (the first entity of the type), each
companion of a retrieval sub-task is the best of `RETRIEVAL_CANDIDATES` candidates under a compatibility
score (category co-occurrence, colour contrast, size fit) instead of a uniform draw; MICo asks GPT-4o to
pick the most compatible candidate, the score plays that role here. Object+Object and Person+Person
sample at random, as MICo does.

De&Re: a coherent "photo" (a person with wear and objects in a scene) is decomposed into one reference per
component plus its scene; the target recomposes it (the exact renderer makes the real photo and its
recomposition identical; meta['photo'] keeps the former).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict

import numpy as np

from data.catalog import MICO
from data.config import DataConfig
from data.instructions import MAX_INSTRUCTION_WORDS, InstructionPlan, Mention, fit_style, unique_cues, word_count
from data.records import Case
from data.scene import COLOURS, SCENES, Scene, Subject
from data.world import EXTRA_COLOUR_SHARE, LAYOUTS, ROW_LAYOUT, Exhausted, World, dataset_world, layout_scene

ENTITY_POOLS: dict[str, tuple[str, ...]] = {
    "O": ("circle", "square"),
    "C": ("triangle", "diamond"),
    "P": ("person", "robot"),
    "M": ("person",),
    "W": ("robot",),
}
SUB_TASK_TYPES: dict[str, tuple[str, ...]] = {  # MICo-150K Table 1
    "object_scene": ("1O1S", "2O1S"),
    "object_object": ("2O", "3O", "4O", "5O"),
    "person_person": ("1M1W", "2M1W", "2W1M", "2M", "2W", "3M", "3W"),
    "person_scene": ("1P1S", "2P1S"),
    "person_object": ("1P1O", "1P2O", "2P1O", "2P2O"),
    "person_clothes": ("1P1C", "1P2C", "1P3C", "1P4C"),
    "person_object_clothes": ("1P1C1O", "1P1C2O", "1P2C1O", "1P2C2O"),
}
DE_RE = "De&Re"
DE_RE_TASK = "decompose_recompose"
COMPOSITION_TYPES = tuple(t for types in SUB_TASK_TYPES.values() for t in types)
SUB_TASK_OF = {t: task for task, types in SUB_TASK_TYPES.items() for t in types} | {DE_RE: DE_RE_TASK}
RETRIEVAL_SUB_TASKS = frozenset({"object_scene", "person_scene", "person_object", "person_clothes", "person_object_clothes", DE_RE_TASK})
RETRIEVAL_CANDIDATES = 4

# How naturally a companion category goes with the primary's (MICo's "male athlete with high heels" is a 0).
CO_OCCURRENCE: dict[str, dict[str, float]] = {
    "person": {"triangle": 1.0, "diamond": 0.8, "circle": 0.7, "square": 0.4, "person": 0.6, "robot": 0.3},
    "robot": {"square": 1.0, "diamond": 0.6, "circle": 0.5, "triangle": 0.3, "person": 0.3, "robot": 0.6},
    "circle": {"square": 0.7, "triangle": 0.5, "diamond": 0.6, "circle": 0.4, "person": 0.5, "robot": 0.5},
    "square": {"circle": 0.7, "triangle": 0.6, "diamond": 0.4, "square": 0.4, "person": 0.5, "robot": 0.5},
    "triangle": {"circle": 0.5, "square": 0.6, "diamond": 0.5, "triangle": 0.4, "person": 0.5, "robot": 0.5},
    "diamond": {"circle": 0.6, "square": 0.4, "triangle": 0.5, "diamond": 0.4, "person": 0.5, "robot": 0.5},
}
SCENE_AFFINITY: dict[str, dict[str, float]] = {  # where each category is usually seen
    "person": {"beach": 1.0, "forest": 0.8, "city": 0.9, "night": 0.5, "snow": 0.7},
    "robot": {"beach": 0.3, "forest": 0.4, "city": 1.0, "night": 0.9, "snow": 0.5},
    "circle": {"beach": 0.9, "forest": 0.5, "city": 0.6, "night": 0.6, "snow": 0.7},
    "square": {"beach": 0.4, "forest": 0.5, "city": 1.0, "night": 0.7, "snow": 0.5},
    "triangle": {"beach": 0.6, "forest": 1.0, "city": 0.5, "night": 0.5, "snow": 0.8},
    "diamond": {"beach": 0.5, "forest": 0.4, "city": 0.8, "night": 1.0, "snow": 0.9},
}
WEIGHTS = {"co_occurrence": 0.4, "contrast": 0.3, "size_fit": 0.3}
MAX_RGB_DISTANCE = float(np.sqrt(3 * 255**2))


def parse_type(composition_type: str) -> list[str]:
    """'1P2C1O' -> ['P', 'C', 'C', 'O'] (scene letters included, in the type's order)."""
    parts = re.findall(r"(\d)([OCPMWS])", composition_type)
    if not parts or "".join(n + k for n, k in parts) != composition_type:
        raise ValueError(f"not a MICo composition type: {composition_type!r}; expected e.g. 1P2C1O")
    return [k for n, k in parts for _ in range(int(n))]


def references_needed(composition_type: str) -> int:
    return len(parse_type(composition_type)) if composition_type != DE_RE else 3


def skipped_types(cfg: DataConfig) -> list[str]:
    """Composition types with more inputs than data.mico_max_references allows (none at the default 5)."""
    return [t for t in COMPOSITION_TYPES if references_needed(t) > cfg.mico_max_references]


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b))) / MAX_RGB_DISTANCE


def compatibility(primary: Subject, candidate: Subject, role: str, context_colours: list[str]) -> float:
    """Score in [0, 1] of `candidate` (entity letter `role`) joining `primary` beside subjects of `context_colours`.

    co-occurrence of the categories; colour contrast = the smallest RGB distance to the colours already in
    the composition (distinct colours keep subjects apart); size fit = wear matches its wearer's size,
    objects are not bigger than the primary.
    """
    cooc = CO_OCCURRENCE[primary.category][candidate.category]
    contrast = min(_contrast(COLOURS[candidate.colour], COLOURS[c]) for c in [primary.colour, *context_colours])
    if role == "C":
        size_fit = float(candidate.size == primary.size)
    else:
        size_fit = float(not (candidate.size == "large" and primary.size == "small"))
    return WEIGHTS["co_occurrence"] * cooc + WEIGHTS["contrast"] * contrast + WEIGHTS["size_fit"] * size_fit


def scene_compatibility(subjects: list[Subject], scene: str) -> float:
    """Mean category affinity to the scene, plus how well the subjects stand out of its sky and ground."""
    affinity = float(np.mean([SCENE_AFFINITY[s.category][scene] for s in subjects]))
    contrast = min(_contrast(COLOURS[s.colour], part) for s in subjects for part in SCENES[scene])
    return 0.5 * affinity + 0.5 * contrast


def _retrieve(candidates: list, scores: list[float]) -> int:
    """Index of the best candidate (the first of equals, so the pick is deterministic)."""
    return int(np.argmax(scores))


class MicoSampler:
    def __init__(self, world: World, max_references: int):
        self.world = world
        self.max_references = max_references

    def _draw(self, role: str, used: set[str]) -> Subject:
        s = self.world.subject(used, category=self.world.pick(ENTITY_POOLS[role]))
        used.add(s.colour)
        return s

    def _companion(self, primary: Subject, role: str, used: set[str], log: list) -> Subject:
        candidates = []
        for _ in range(RETRIEVAL_CANDIDATES):
            try:
                candidates.append(self.world.subject(used, category=self.world.pick(ENTITY_POOLS[role])))
            except Exhausted:
                continue
        if not candidates:
            raise Exhausted
        context = sorted(used - {primary.colour})
        scores = [compatibility(primary, c, role, context) for c in candidates]
        best = _retrieve(candidates, scores)
        log.append({"role": role, "primary": asdict(primary), "context": context,
                    "candidates": [asdict(c) for c in candidates], "scores": scores, "picked": best})
        used.add(candidates[best].colour)
        return candidates[best]

    def _scene(self, subjects: list[Subject], log: list) -> str:
        names = list(SCENES)
        candidates = [names[i] for i in self.world.rng.permutation(len(names))[:RETRIEVAL_CANDIDATES]]
        scores = [scene_compatibility(subjects, s) for s in candidates]
        best = _retrieve(candidates, scores)
        log.append({"role": "S", "candidates": candidates, "scores": scores, "picked": best})
        return candidates[best]

    def subjects(self, roles: list[str], retrieval: bool, log: list) -> list[Subject]:
        used: set[str] = set()
        primary = self._draw(roles[0], used)
        out = [primary]
        for role in roles[1:]:
            out.append(self._companion(primary, role, used, log) if retrieval else self._draw(role, used))
        return out

    def case(self, key: str, composition_type: str) -> Case:
        for _ in range(100):
            try:
                return self._case(key, composition_type)
            except Exhausted:
                continue
        raise RuntimeError(f"could not draw a MICo {composition_type} case")

    def _case(self, key: str, composition_type: str) -> Case:
        task = SUB_TASK_OF[composition_type]
        retrieval = task in RETRIEVAL_SUB_TASKS
        log: list = []
        world = self.world
        if composition_type == DE_RE:
            n_wear = int(world.rng.integers(0, self.max_references - 1))  # adaptive: person + wear + objects + scene
            n_obj = int(world.rng.integers(0, self.max_references - 1 - n_wear))
            roles = ["P"] + ["C"] * n_wear + ["O"] * n_obj
            with_scene = True
        else:
            letters = parse_type(composition_type)
            roles = [x for x in letters if x != "S"]
            with_scene = "S" in letters
        subjects = self.subjects(roles, retrieval, log)
        background = self._scene(subjects, log) if (with_scene and retrieval) else world.pick(list(SCENES))
        size = world.image_size
        refs = [layout_scene(world.pick(list(SCENES)), [s], ["center"], "single", size) for s in subjects]
        scene_image = None
        if with_scene:
            refs.append(Scene(background=background, placements=(), size=size))
            scene_image = len(refs)
        layout = ROW_LAYOUT[len(subjects)]
        slots = world.permutation(list(LAYOUTS[layout]))[: len(subjects)]
        mentions = [
            Mention(image=i + 1, domain=s.domain, slot=slots[i],
                    cues=unique_cues([(s, "center")], 0, world.rng, extra_colour=EXTRA_COLOUR_SHARE))
            for i, s in enumerate(subjects)
        ]
        plan = InstructionPlan(tuple(mentions), layout, background, scene_image, int(world.rng.integers(1_000_000)))
        if word_count(world.writer.write(fit_style(plan, world.writer))) > MAX_INSTRUCTION_WORDS:
            plan = dataclasses.replace(plan, mentions=tuple(dataclasses.replace(m, cues={"category": m.cues["category"]}) for m in mentions))
        plan = fit_style(plan, world.writer)
        target = layout_scene(background, subjects, slots, layout, size)
        meta = {"plan": plan.to_dict(), "mico_roles": roles + (["S"] if with_scene else []), "retrieval": log}
        if composition_type == DE_RE:
            meta["photo"] = target.to_dict()
        case = Case(
            key=key,
            task_type=task,
            case_type=composition_type,
            instruction=world.writer.write(plan),
            references=refs,
            target=target,
            subject_list=[[m.phrase] for m in plan.mentions] + ([[]] if with_scene else []),
            subject_label=[[1] for _ in plan.mentions] + ([[]] if with_scene else []),
            meta=meta,
        )
        case.qa = world.qa(case)
        return case


def enabled_types(cfg: DataConfig) -> list[str]:
    skipped = set(skipped_types(cfg))
    types = [t for t in COMPOSITION_TYPES if t not in skipped]
    return types + ([DE_RE] if cfg.mico_max_references >= references_needed(DE_RE) else [])


def mico_cases(cfg: DataConfig) -> list[Case]:
    """cfg.sizes.mico rows, the composition types in turn (MICo balances its types, Table 1)."""
    types = enabled_types(cfg)
    if not types:
        raise ValueError(f"no MICo composition type fits data.mico_max_references={cfg.mico_max_references}; it needs >= 2")
    sampler = MicoSampler(dataset_world(cfg, MICO, "train"), cfg.mico_max_references)
    return [sampler.case(f"mico_{i:06d}", types[i % len(types)]) for i in range(cfg.sizes.mico)]
