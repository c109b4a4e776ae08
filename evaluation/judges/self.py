"""The `self` judge: SconeEval scores from the model's own understanding expert.

Every figure is a yes-probability P(q) = pipeline.yes_probability([generated image], [q]) (the
checkpoint's understanding expert, model.pipeline) for a question written in the templates the model was trained on
(data.instructions.QA_TEMPLATES): "is there <desc>", "is <the desc> <position>", "is this
<background>". Only the generated image is looked at; what to ask about comes from the case:

- a candidate's description `desc` is what its reference shows: the subject of the reference
  scene (colour, texture, category, exactly as data.instructions.describe writes it), or, for a
  benchmark read without ground truth, the words of its subject_list phrase (position and size
  words dropped: they describe the reference image, not the output);
- the position the instruction gives a subject and the background it names are read from the
  case's target scene graph (the instruction's meaning), when there is one.

Calibration. A raw P(yes) mixes evidence with the model's general readiness to say yes, so every
probability is compared with the answer to a counterfactual question that should be "no":

    lift(p, q) = clip((p - q) / (1 - q), 0, 1)          (0 when q = 1)

0 when the real question gets no more "yes" than the counterfactual, 1 when it is certain and
the counterfactual is not. Counterfactuals (deterministic): another category of the same domain
(first in palette order not used by the case), another colour (first palette colour no subject of
the case has), another texture (first different one), the mirrored position (left<->right,
top<->bottom, corners diagonally; middle -> left) and another scene (first different one).

For each required subject s (a candidate with subject_label 1):
    presence_s = lift(P(there s), P(there s with another category))
    position_s = lift(P(s at its slot), P(s at the mirrored slot))    when the instruction places
                                                                       subjects (target with >= 2)
    identity_s = mean(lift(P(there s), P(there s with another colour)),
                      lift(P(there s), P(there s with another texture)))  (attributes known only)
For each distractor d (label 0): extra_d = lift(P(there d), P(there d with another category)).
Background b (when the instruction names it in words, or a reference image supplies it, as
evaluation.judges.oracle.background_source decides): lift(P(this is b), P(this is another scene)).

    PF = 10 * mean_s(0.4 presence_s + 0.6 position_s  |  presence_s when no position is stated)
            * (0.75 + 0.25 background, when the scene is named in words) / (1 + sum_d extra_d)
    SC = 10 * mean(identity_s for every s, plus background when a reference image supplies it)
    presence(i, phrase) = 1  iff  P(there c) >= 0.5 and P(there c) > P(there c with another colour)
                                  (another category when the colour is unknown)

The weights (0.4 / 0.6 presence / position, 0.25 background share of PF, the extras penalty)
are the oracle judge's, so both judges read the same scale. A model that answers 0.5 to
everything (an LM head without preference) scores PF = SC = 0 and finds nothing present: no evidence, no
credit. Deterministic; one batched understanding call per case, answers cached per image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.instructions import BACKGROUND_PHRASES, QA_TEMPLATES, TARGET_POSITION_PHRASES
from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, SCENES, TEXTURES
from evaluation.judges.oracle import OracleThresholds, background_source

MIRROR = {
    "left": "right", "right": "left", "top": "bottom", "bottom": "top", "middle": "left", "center": "left",
    "top left": "bottom right", "bottom right": "top left", "top right": "bottom left", "bottom left": "top right",
}
_DEFAULTS = OracleThresholds()
PF_PRESENCE_WEIGHT = _DEFAULTS.pf_presence_weight  # 0.4
PF_BACKGROUND_WEIGHT = _DEFAULTS.pf_background_weight  # 0.25


def lift(p: float, q: float) -> float:
    """How far P(yes) to the real question rises above P(yes) to its counterfactual, in [0, 1]."""
    if q >= 1.0:
        return 0.0
    return float(min(1.0, max(0.0, (p - q) / (1.0 - q))))


@dataclass(frozen=True)
class Desc:
    """What a question says about a subject; colour / texture None when unknown (phrase-only cases)."""

    domain: str
    category: str
    colour: str | None = None
    texture: str | None = None

    @classmethod
    def of(cls, subject) -> "Desc":
        return cls(subject.domain, subject.category, subject.colour, subject.texture)

    @classmethod
    def from_phrase(cls, phrase: str, case_key: str) -> "Desc":
        words = phrase.split()
        cats = [w for w in words if w in OBJECT_CATEGORIES or w in CHARACTER_CATEGORIES]
        if not cats:
            raise ValueError(
                f"case {case_key}: the phrase {phrase!r} names no category of the subject world, and the case has no "
                "reference scenes; the self judge cannot ask about it (rebuild the benchmark with ground_truth.jsonl)"
            )
        category = cats[-1]
        return cls(
            "character" if category in CHARACTER_CATEGORIES else "object",
            category,
            next((w for w in words if w in COLOURS), None),
            next((w for w in words if w in TEXTURES), None),
        )

    def text(self, article: str = "a") -> str:
        """Worded as data.instructions.describe: 'a striped red circle', 'a robot in dotted blue'."""
        tex = [] if self.texture in (None, "plain") else [self.texture]
        if self.domain == "character":
            words = [self.category] + (["in", *tex, self.colour] if self.colour else [])
        else:
            words = [*tex, *([self.colour] if self.colour else []), self.category]
        if article == "a" and words[0][0] in "aeiou":
            article = "an"
        return " ".join([article, *words])

    def name(self) -> str:
        return self.text("a").split(" ", 1)[1]


def there(d: Desc) -> str:
    return QA_TEMPLATES[0].format(desc=d.text("a"))


def at(d: Desc, slot: str) -> str:
    return QA_TEMPLATES[1].format(desc=d.text("the"), position=TARGET_POSITION_PHRASES[slot])


def scene_is(background: str) -> str:
    return QA_TEMPLATES[2].format(background=BACKGROUND_PHRASES[background])


@dataclass
class Candidate:
    ref: int
    index: int
    phrase: str
    label: int
    desc: Desc
    slot: str | None = None


class SelfJudge:
    name = "self"
    deterministic = True
    concurrency = 1  # one model; the runner then judges case after case

    def __init__(self, pipeline, cache_size: int = 50_000):
        self.pipeline = pipeline  # model.pipeline: whatever checkpoint it loaded, it answers yes/no questions
        self._answers: dict[tuple[str, str], float] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, eval_cfg=None, checkpoint_dir: str | Path | None = None, pipeline=None) -> "SelfJudge":
        """The judge of a checkpoint: pass its `pipeline` (model.pipeline.load_pipeline), or `checkpoint_dir` to
        load one."""
        if pipeline is not None:
            return cls(pipeline)
        from model.pipeline import load_pipeline

        if checkpoint_dir is None:
            raise ValueError(
                "the self judge needs the checkpoint's model: make_judge('self', eval_cfg, checkpoint_dir=DIR) "
                "or make_judge('self', eval_cfg, pipeline=load_pipeline(DIR))"
            )
        return cls(load_pipeline(checkpoint_dir))

    # ------------------------------------------------------------------ asking

    def ask(self, image: np.ndarray, questions: list[str]) -> dict[str, float]:
        """P(yes) per question about `image`, each question asked once per image."""
        from evaluation.detect import to_array

        arr = to_array(image)
        digest = hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()
        with self._lock:
            known = {q: self._answers[(digest, q)] for q in questions if (digest, q) in self._answers}
            todo = list(dict.fromkeys(q for q in questions if q not in known))
            if todo:
                probs = self.pipeline.yes_probability([arr] * len(todo), todo)
                fresh = {q: float(v) for q, v in zip(todo, probs)}
                if len(self._answers) + len(fresh) > self._cache_size:
                    self._answers.clear()
                self._answers.update({(digest, q): v for q, v in fresh.items()})
                known.update(fresh)
        return {q: known[q] for q in questions}

    # ------------------------------------------------------------------ the case, in questions

    def candidates(self, case) -> list[Candidate]:
        out = []
        for i, (phrases, labels) in enumerate(zip(case.subject_list, case.subject_label)):
            ref = case.references[i] if i < len(case.references) else None
            for j, (phrase, label) in enumerate(zip(phrases, labels)):
                if ref is not None and j < len(ref.placements):
                    desc = Desc.of(ref.placements[j].subject)
                else:
                    desc = Desc.from_phrase(phrase, case.key)
                out.append(Candidate(i, j, phrase, int(label), desc))
        slots = _target_slots(case)
        for c in out:
            c.slot = slots.get(c.desc.colour) if c.desc.colour else None
        return out

    def _counterfactuals(self, case, cands: list[Candidate]):
        used_colours = {c.desc.colour for c in cands if c.desc.colour}
        if case.target is not None:
            used_colours |= {p.subject.colour for p in case.target.placements}
        used_categories = {c.desc.category for c in cands}

        def other_colour(d: Desc) -> Desc:
            free = [c for c in COLOURS if c not in used_colours] or [c for c in COLOURS if c != d.colour]
            return dataclasses.replace(d, colour=free[0])

        def other_texture(d: Desc) -> Desc:
            return dataclasses.replace(d, texture=next(t for t in TEXTURES if t != d.texture))

        def other_category(d: Desc) -> Desc:
            pool = CHARACTER_CATEGORIES if d.domain == "character" else OBJECT_CATEGORIES
            free = [c for c in pool if c not in used_categories] or [c for c in pool if c != d.category]
            return dataclasses.replace(d, category=free[0])

        return other_colour, other_texture, other_category

    # ------------------------------------------------------------------ the judge protocol

    def composition(self, case, image) -> tuple[float, float, tuple[str, str]]:
        cands = self.candidates(case)
        other_colour, other_texture, other_category = self._counterfactuals(case, cands)
        required = list({c.desc: c for c in cands if c.label == 1}.values())
        distractors = [c for c in cands if c.label != 1 and c.desc not in {r.desc for r in required}]
        source = background_source(case)
        background = _background(case, source)
        positions = all(c.slot is not None for c in required) and len(required) >= 2

        questions = []
        for c in required + distractors:
            questions += [there(c.desc), there(other_category(c.desc))]
        for c in required:
            if c.desc.colour:
                questions.append(there(other_colour(c.desc)))
            if c.desc.texture:
                questions.append(there(other_texture(c.desc)))
            if positions:
                questions += [at(c.desc, c.slot), at(c.desc, MIRROR[c.slot])]
        if background:
            questions += [scene_is(background), scene_is(_other_scene(background))]
        p = self.ask(image, questions)

        pf_parts, sc_parts, pf_items, sc_items = [], [], [], []
        for c in required:
            presence = lift(p[there(c.desc)], p[there(other_category(c.desc))])
            item = f"{c.desc.name()}: there {p[there(c.desc)]:.2f} vs other kind {p[there(other_category(c.desc))]:.2f} -> {presence:.2f}"
            if positions:
                position = lift(p[at(c.desc, c.slot)], p[at(c.desc, MIRROR[c.slot])])
                pf_items.append(PF_PRESENCE_WEIGHT * presence + (1 - PF_PRESENCE_WEIGHT) * position)
                item += f", {c.slot} {p[at(c.desc, c.slot)]:.2f} vs {MIRROR[c.slot]} {p[at(c.desc, MIRROR[c.slot])]:.2f} -> {position:.2f}"
            else:
                pf_items.append(presence)
            pf_parts.append(item)

            lifts, words = [], []
            if c.desc.colour:
                q = p[there(other_colour(c.desc))]
                lifts.append(lift(p[there(c.desc)], q))
                words.append(f"other colour {q:.2f} -> {lifts[-1]:.2f}")
            if c.desc.texture:
                q = p[there(other_texture(c.desc))]
                lifts.append(lift(p[there(c.desc)], q))
                words.append(f"other texture {q:.2f} -> {lifts[-1]:.2f}")
            if not lifts:
                lifts.append(presence)
                words.append(f"no attribute known, presence {presence:.2f}")
            sc_items.append(float(np.mean(lifts)))
            sc_parts.append(f"{c.desc.name()}: there {p[there(c.desc)]:.2f}; " + ", ".join(words))

        extras = [lift(p[there(d.desc)], p[there(other_category(d.desc))]) for d in distractors]
        penalty = 1.0 / (1.0 + sum(extras))
        if extras:
            pf_parts.append("distractors: " + ", ".join(f"{d.desc.name()} {e:.2f}" for d, e in zip(distractors, extras)) + f" -> x{penalty:.2f}")
        bg_factor = 1.0
        if background:
            b = lift(p[scene_is(background)], p[scene_is(_other_scene(background))])
            what = f"background {background} {p[scene_is(background)]:.2f} vs {_other_scene(background)} {p[scene_is(_other_scene(background))]:.2f} -> {b:.2f}"
            if source == "text":
                bg_factor = 1.0 - PF_BACKGROUND_WEIGHT + PF_BACKGROUND_WEIGHT * b
                pf_parts.append(what + f" (named in the instruction) -> x{bg_factor:.2f}")
            else:
                sc_items.append(b)
                sc_parts.append(what + " (from a reference image)")
        pf = 10.0 * (float(np.mean(pf_items)) if pf_items else 0.0) * bg_factor * penalty
        sc = 10.0 * (float(np.mean(sc_items)) if sc_items else 0.0)
        return pf, sc, (f"PF {pf:.2f}: " + "; ".join(pf_parts or ["no required subject"]),
                        f"SC {sc:.2f}: " + "; ".join(sc_parts or ["no required subject"]))

    def presence(self, case, ref_index: int, phrase: str, image) -> tuple[int, str]:
        if not 0 <= ref_index < len(case.subject_list) or phrase not in case.subject_list[ref_index]:
            raise ValueError(f"case {case.key}: {phrase!r} is not a candidate of reference {ref_index} "
                             f"(subject_list: {case.subject_list})")
        cands = self.candidates(case)
        c = next(c for c in cands if c.ref == ref_index and c.phrase == phrase)
        other_colour, _, other_category = self._counterfactuals(case, cands)
        contrast = other_colour(c.desc) if c.desc.colour else other_category(c.desc)
        p = self.ask(image, [there(c.desc), there(contrast)])
        yes, no = p[there(c.desc)], p[there(contrast)]
        present = int(yes >= 0.5 and yes > no)
        return present, (f"{phrase!r} (image {ref_index + 1}): asked {there(c.desc)!r} {yes:.2f} vs {there(contrast)!r} "
                         f"{no:.2f}: {'present' if present else 'absent'}")


def _target_slots(case) -> dict[str, str]:
    """Colour -> the slot the instruction gives that subject (from the target scene), when it places
    two or more subjects on the world's layout slots; {} otherwise."""
    from data.world import slot_of

    target = getattr(case, "target", None)
    if target is None or len(target.placements) < 2:
        return {}
    try:
        return {p.subject.colour: slot_of(target, k) for k, p in enumerate(target.placements)}
    except ValueError:  # not on the world's slots: the position is not something to ask about
        return {}


def _background(case, source: str | None) -> str | None:
    if source is None:
        return None
    if case.target is not None:
        return case.target.background
    scene_refs = [r for r in case.references if r is not None and not r.placements]
    return scene_refs[0].background if scene_refs else None


def _other_scene(background: str) -> str:
    return next(s for s in SCENES if s != background)
