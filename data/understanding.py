"""Understanding rows: the subject world's exact scene graphs as questions and answers.

BAGEL arrives with an understanding expert and a ViT that already read images; the tiny release starts from fresh
weights, so the chain teaches that skill first (`und_pretrain`, params.yaml train.stages) the way a VLM is
pretrained: images, questions about them, and the language-model loss on the answers. Two datasets:

- `und_pretrain`: training rows, subjects of the training combinations (data.world.TRAIN_COMBOS), own stream;
- `und_heldout`: the held-out question set every checkpoint is scored on (evaluation.understanding): other images
  (its own stream) of subjects from the benchmark's held-out combinations (data.world.HELD_OUT_COMBOS), so no
  held-out subject was ever seen in training, every question of every type about each image, no captions.

Scenes: 1-4 subjects of distinct colours in the layouts the other datasets use (a row, a column of two, the 2 x 2
grid), or REPEATED_SHARE of the time 2-4 copies of one subject (SRUM's numeracy prompts draw those); every subject
at least half visible.

Question types (QUESTION_TYPES), each in a yes / no form and, but for presence, a one-word form:

- presence: "is there a striped red circle" (the world's exact description, `describe`: no texture word means
  plain), "is there a circle", "is there a red" (SRUM's regional question); negatives change one attribute of a
  present subject (hard negatives) or name an absent category / colour. A description whose truth would depend on
  reading a missing texture word as "plain" or as "any" (a red circle asked about a striped red circle) is never
  asked, so the rows agree with the exact reading of the other datasets' questions and with the loose reading of
  the referring phrases below.
- colour / shape / texture / position: about a referent ("the red one", "the circle on the left", "the robot in
  blue"), a phrase built from the other attributes; asked only when every subject the phrase picks out has the
  same answer. "what colour is the circle" -> "red"; "is the red one a circle" -> "yes"; "what pattern is the red
  circle" -> "striped"; "where is the red circle" -> "left" ("middle" for a lone subject, "top left" in the grid);
  "is the red circle on the right" -> "no" (QA_TEMPLATES' position form, as the self judge asks it).
- count: "how many circles are there" -> "two" ("zero" .. "four"; nouns: things, a category, a colour's things);
  "are there three red things" -> "no".
- scene: "is this at the beach" (QA_TEMPLATES), "what place is this" -> "beach".
- caption (training rows only): "describe the image" -> "a red circle on the left and a robot in blue on the
  right at the beach"; also the row's `instruction`, so readers of the Scone-S2I layout see what the image shows.

Rows are Scone-S2I rows (data.records.Case.to_row) of task type "understanding": `image` holds the one image,
`qa` every question with its answer, `meta.qa_types` the type of each. Answers are one word ("yes", "no", a
colour, a category, a texture, a number word, a scene) except grid positions ("top left") and captions.
"""
from __future__ import annotations

import dataclasses
import itertools

from data.catalog import UND, UND_HELDOUT
from data.config import DataConfig
from data.instructions import (BACKGROUND_PHRASES, NUMBER_WORDS, PLURALS, TARGET_POSITION_PHRASES,
                               UNDERSTANDING_TEMPLATES, counted, describe, qa_background, qa_there)
from data.records import Case
from data.render import visible_fraction
from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, SCENES, TEXTURES, Scene, Subject
from data.world import LAYOUTS, ROW_LAYOUT, Exhausted, World, dataset_world, layout_scene

TASK_TYPE = "understanding"
QUESTION_TYPES = ("presence", "colour", "shape", "texture", "count", "position", "scene")
CAPTION = "caption"
WORD_TYPES = tuple(t for t in QUESTION_TYPES if t != "presence")  # types with a one-word form
YES, NO = "yes", "no"
CATEGORIES = (*OBJECT_CATEGORIES, *CHARACTER_CATEGORIES)
COUNT_WORDS = {0: "zero", **NUMBER_WORDS}
REPEATED_SHARE = 0.2  # scenes of 2-4 copies of one subject (counting, as SRUM's numeracy prompts)
COLUMN_SHARE = 0.3  # two distinct subjects stacked (top / bottom, SRUM's "above" / "below") instead of side by side
# Per training image: yes / no questions of this many types (one "yes" and one "no" each), one-word questions of
# this many types, and a caption with this probability. The held-out set asks every type of every image.
TRAIN_YES_NO_TYPES = 3
TRAIN_WORD_TYPES = 2
TRAIN_CAPTION_SHARE = 0.25
MIN_VISIBLE = 0.5  # data.quality.MIN_VISIBLE_FRACTION: a subject hidden more would make its answers unknowable


def answer_kind(question_type: str, answer: str) -> str:
    """'yes_no', 'word' (one word or a grid position) or 'caption'."""
    if question_type == CAPTION:
        return "caption"
    return "yes_no" if answer in (YES, NO) else "word"


# ------------------------------------------------------------------ scenes


@dataclasses.dataclass(frozen=True)
class Placed:
    """A subject of the scene and its slot (the position words come from the slot)."""

    subject: Subject
    slot: str

    @property
    def position(self) -> str:
        """The one-word answer to 'where is it': the slot, a lone subject's centre read as 'middle'."""
        return "middle" if self.slot == "center" else self.slot

    def value(self, key: str) -> str:
        return self.slot if key == "position" else getattr(self.subject, key)


def draw_scene(world: World) -> tuple[Scene, list[Placed], str]:
    """(scene, its subjects with their slots, layout) with every subject at least half visible."""
    for _ in range(100):
        try:
            scene, placed, layout = _draw(world)
        except Exhausted:
            continue
        if all(visible_fraction(scene, i) >= MIN_VISIBLE for i in range(len(placed))):
            return scene, placed, layout
    raise RuntimeError("could not draw a scene with every subject visible in 100 tries")


def _draw(world: World) -> tuple[Scene, list[Placed], str]:
    background = world.pick(list(SCENES))
    if world.rng.random() < REPEATED_SHARE:
        n = int(world.rng.integers(2, 5))
        one = world.subject(set())
        if n == 3:  # three large subjects in a row overlap (as SRUM's numeracy prompts)
            one = dataclasses.replace(one, size="small")
        subjects = [dataclasses.replace(one, uid=f"{one.uid}-{k}") for k in range(n)]
        layout = "column" if n == 2 and world.rng.random() < COLUMN_SHARE else ROW_LAYOUT[n]
        slots = list(LAYOUTS[layout])
    else:
        n = int(world.rng.integers(1, 5))
        used: set[str] = set()
        subjects = []
        for _ in range(n):
            s = world.subject(used)
            used.add(s.colour)
            subjects.append(s)
        layout = "column" if n == 2 and world.rng.random() < COLUMN_SHARE else ROW_LAYOUT[n]
        slots = world.permutation(list(LAYOUTS[layout]))[:n]
    scene = layout_scene(background, subjects, slots, layout, world.image_size)
    return scene, [Placed(s, slot) for s, slot in zip(subjects, slots)], layout


# ------------------------------------------------------------------ phrases


def reading_order(placed: list[Placed], layout: str) -> list[Placed]:
    order = list(LAYOUTS[layout])
    return sorted(placed, key=lambda p: order.index(p.slot))


def caption(placed: list[Placed], layout: str, background: str) -> str:
    """'a red circle on the left and a robot in blue on the right at the beach'; copies of one subject are
    counted ('three red circles at the beach'); a lone subject has no position words."""
    where = BACKGROUND_PHRASES[background]
    subjects = [p.subject for p in placed]
    if len(placed) > 1 and all(dataclasses.replace(s, uid="") == dataclasses.replace(subjects[0], uid="")
                               for s in subjects):
        return f"{counted(subjects[0], len(placed))} {where}"
    if len(placed) == 1:
        return f"{describe(subjects[0])} {where}"
    parts = [f"{describe(p.subject)} {TARGET_POSITION_PHRASES[p.slot]}" for p in reading_order(placed, layout)]
    return " , ".join(parts[:-1]) + f" and {parts[-1]} {where}"


def referent(cues: dict[str, str]) -> str:
    """A referring phrase from some of a subject's attributes (category, colour, texture, position):
    'the striped red circle', 'the robot in blue', 'the red one on the left', 'the one at the top'."""
    words = ["the"]
    category = cues.get("category")
    texture = [cues["texture"]] if cues.get("texture") else []
    colour = [cues["colour"]] if cues.get("colour") else []
    if category in CHARACTER_CATEGORIES and colour:
        words += [category, "in", *texture, *colour]
    else:
        words += [*texture, *colour, category or "one"]
    if cues.get("position"):
        words.append(TARGET_POSITION_PHRASES[cues["position"]])
    return " ".join(words)


def matches(cues: dict[str, str], p: Placed) -> bool:
    """Whether a referent picks out `p` (loosely: the attributes it names are p's, the others may be anything)."""
    return all(p.value(key) == value for key, value in cues.items())


REFERENT_KEYS = ("category", "colour", "texture", "position")


def find_referent(placed: list[Placed], target: Placed, asked: str, world: World) -> dict[str, str] | None:
    """Cues naming `target` without the attribute `asked`, such that every subject they pick out has the same
    value of `asked` (so the answer is defined); the fewest cues that do, one of them at random. A texture cue
    is used only when it is marked (the world never says 'plain')."""
    keys = [k for k in REFERENT_KEYS if k != asked and not (k == "texture" and target.subject.texture == "plain")]
    for size in range(1, len(keys) + 1):
        found = []
        for combo in itertools.combinations(keys, size):
            cues = {k: target.value(k) for k in combo}
            picked = [p for p in placed if matches(cues, p)]
            if len({p.value(asked) for p in picked}) == 1:
                found.append(cues)
        if found:
            return found[int(world.rng.integers(len(found)))]
    return None


def full_referent(placed: list[Placed], target: Placed) -> dict[str, str] | None:
    """The cues of the world's exact description ('the striped red circle', as the self judge refers to a subject
    when it asks where it is), when they pick out subjects that all share target's slot."""
    cues = {"category": target.subject.category, "colour": target.subject.colour}
    if target.subject.texture != "plain":
        cues["texture"] = target.subject.texture
    picked = [p for p in placed if matches(cues, p)]
    return cues if len({p.slot for p in picked}) == 1 else None


# ------------------------------------------------------------------ questions


def _other(world: World, values, not_this: str) -> str:
    return world.pick([v for v in values if v != not_this])


def _exact(desc: Subject, placed: list[Placed]) -> bool:
    """'is there <describe(desc)>' read exactly (no texture word = plain)."""
    key = describe(desc)
    return any(describe(p.subject) == key for p in placed)


def _loose(desc: Subject, placed: list[Placed]) -> bool:
    """The same question read loosely (no texture word = any texture)."""
    if desc.texture != "plain":
        return _exact(desc, placed)
    return any(p.subject.category == desc.category and p.subject.colour == desc.colour for p in placed)


def presence_questions(world: World, placed: list[Placed]) -> tuple[list[str], list[str]]:
    """(yes questions, no questions) of the presence type."""
    yes, no = [], []
    present_categories = {p.subject.category for p in placed}
    present_colours = {p.subject.colour for p in placed}
    for p in placed:
        s = p.subject
        yes.append(qa_there(s))  # the exact description of a present subject: true under both readings
        yes.append(f"is there {'an' if s.category[0] in 'aeiou' else 'a'} {s.category}")
        yes.append(f"is there a {s.colour}" if s.colour[0] not in "aeiou" else f"is there an {s.colour}")
        # hard negatives: one attribute changed
        for key, values in (("colour", COLOURS), ("category", CATEGORIES), ("texture", TEXTURES)):
            fake = dataclasses.replace(s, **{key: _other(world, list(values), getattr(s, key))})
            if key == "category":
                fake = dataclasses.replace(fake, domain="character" if fake.category in CHARACTER_CATEGORIES
                                           else "object")
            if _exact(fake, placed) == _loose(fake, placed):  # never a question whose answer depends on the reading
                (yes if _exact(fake, placed) else no).append(qa_there(fake))
    absent_categories = [c for c in CATEGORIES if c not in present_categories]
    if absent_categories:
        no.append(f"is there a {world.pick(absent_categories)}")
    absent_colours = [c for c in COLOURS if c not in present_colours]
    if absent_colours:
        c = world.pick(absent_colours)
        no.append(f"is there {'an' if c[0] in 'aeiou' else 'a'} {c}")
    return yes, no


def attribute_questions(world: World, placed: list[Placed], asked: str) -> tuple[list, list, list]:
    """(yes, no, word) questions about the attribute `asked` (colour, category, texture or position) of the
    subjects; word questions as (question, answer)."""
    t = UNDERSTANDING_TEMPLATES
    values = {"colour": list(COLOURS), "category": list(CATEGORIES), "texture": list(TEXTURES)}
    yes, no, word = [], [], []
    for p in placed:
        cues = find_referent(placed, p, asked, world)
        if asked == "position" and world.rng.random() < 0.5:  # half the time as the self judge words it
            cues = full_referent(placed, p) or cues
        if cues is None:
            continue
        ref = referent(cues)
        truth = p.value(asked)
        if asked == "position":
            wrong = [s for s in LAYOUTS[_layout_of(placed)] if s != p.slot] or ["left", "right"]  # a lone subject
            yes.append(f"is {ref} {TARGET_POSITION_PHRASES[p.slot]}")
            no.append(f"is {ref} {TARGET_POSITION_PHRASES[world.pick(wrong)]}")
            word.append((t["position"].format(ref=ref), p.position))
            continue
        other = _other(world, values[asked], truth)
        if asked == "colour":
            yes.append(t["colour_yes_no"].format(ref=ref, colour=truth))
            no.append(t["colour_yes_no"].format(ref=ref, colour=other))
            word.append((t["colour"].format(ref=ref), truth))
        elif asked == "category":
            yes.append(t["shape_yes_no"].format(ref=ref, category=truth))
            no.append(t["shape_yes_no"].format(ref=ref, category=other))
            word.append((t["shape"].format(ref=ref), truth))
        elif asked == "texture":
            yes.append(t["texture_yes_no"].format(ref=ref, texture=truth))
            no.append(t["texture_yes_no"].format(ref=ref, texture=other))
            word.append((t["texture"].format(ref=ref), truth))
    return yes, no, word


def _layout_of(placed: list[Placed]) -> str:
    slots = {p.slot for p in placed}
    for layout in ([ROW_LAYOUT[len(placed)]] if len(placed) in ROW_LAYOUT else []) + list(LAYOUTS):
        if slots <= set(LAYOUTS[layout]):
            return layout
    raise ValueError(f"slots {sorted(slots)} belong to no layout")


def count_questions(world: World, placed: list[Placed]) -> tuple[list, list, list]:
    """(yes, no, word) counting questions: all subjects ('things'), one category, one colour's things."""
    t = UNDERSTANDING_TEMPLATES
    nouns = [("things", len(placed))]
    for category in {p.subject.category for p in placed} | {world.pick(list(CATEGORIES))}:
        nouns.append((PLURALS[category], sum(p.subject.category == category for p in placed)))
    for colour in {p.subject.colour for p in placed} | {world.pick(list(COLOURS))}:
        nouns.append((f"{colour} things", sum(p.subject.colour == colour for p in placed)))
    nouns.sort()  # sets have no fixed order; the rows must not depend on hashing
    yes, no, word = [], [], []
    for noun, n in nouns:
        word.append((t["count"].format(noun=noun), COUNT_WORDS[n]))
        if n >= 2:  # "are there one ..." is not English: yes / no counts claim two to four
            yes.append(t["count_yes_no"].format(number=NUMBER_WORDS[n], noun=noun))
        claim = _other(world, [k for k in NUMBER_WORDS if k >= 2], n)
        no.append(t["count_yes_no"].format(number=NUMBER_WORDS[claim], noun=noun))
    return yes, no, word


def scene_questions(world: World, background: str) -> tuple[list, list, list]:
    return ([qa_background(background)], [qa_background(_other(world, list(SCENES), background))],
            [(UNDERSTANDING_TEMPLATES["scene"], background)])


def questions(world: World, placed: list[Placed], background: str) -> dict[str, tuple[list, list, list]]:
    """Per question type: (yes questions, no questions, (word question, answer) pairs); the candidates the rows'
    questions are drawn from."""
    presence_yes, presence_no = presence_questions(world, placed)
    pools = {"presence": (presence_yes, presence_no, [])}
    for kind, attribute in (("colour", "colour"), ("shape", "category"), ("texture", "texture"),
                            ("position", "position")):
        pools[kind] = attribute_questions(world, placed, attribute)
    pools["count"] = count_questions(world, placed)
    pools["scene"] = scene_questions(world, background)
    return pools


def select(world: World, pools: dict, yes_no_types: int | None, word_types: int | None) -> list[tuple[str, str, str]]:
    """(question, answer, type) drawn from the pools: for `yes_no_types` types (None: all that have both) one
    "yes" and one "no" question each, for `word_types` types (None: all) one one-word question each."""
    balanced = [k for k in QUESTION_TYPES if pools[k][0] and pools[k][1]]
    worded = [k for k in QUESTION_TYPES if pools[k][2]]
    if yes_no_types is not None:
        balanced = sorted(world.permutation(balanced)[:yes_no_types], key=QUESTION_TYPES.index)
    if word_types is not None:
        worded = sorted(world.permutation(worded)[:word_types], key=QUESTION_TYPES.index)
    out = []
    for kind in balanced:
        yes, no, _ = pools[kind]
        out.append((world.pick(yes), YES, kind))
        out.append((world.pick(no), NO, kind))
    for kind in worded:
        question, answer = world.pick(pools[kind][2])
        out.append((question, answer, kind))
    return out


# ------------------------------------------------------------------ rows


def understanding_case(world: World, key: str, *, heldout: bool) -> Case:
    scene, placed, layout = draw_scene(world)
    pools = questions(world, placed, scene.background)
    if heldout:
        qa = select(world, pools, None, None)
    else:
        qa = select(world, pools, TRAIN_YES_NO_TYPES, TRAIN_WORD_TYPES)
    text = caption(placed, layout, scene.background)
    if not heldout and world.rng.random() < TRAIN_CAPTION_SHARE:
        qa.append((UNDERSTANDING_TEMPLATES["caption"], text, CAPTION))
    qa = world.permutation(qa)  # the order of a row's questions carries no answer
    repeated = len({dataclasses.replace(p.subject, uid="") for p in placed}) < len(placed)
    return Case(
        key=key, task_type=TASK_TYPE, case_type=f"{layout}_repeated" if repeated else layout, instruction=text,
        references=[], target=scene, subject_list=[], subject_label=[],
        qa=[(q, a) for q, a, _ in qa],
        meta={"qa_types": [k for _, _, k in qa], "slots": [p.slot for p in placed], "layout": layout},
    )


def understanding_cases(cfg: DataConfig, name: str) -> list[Case]:
    """The rows of `und_pretrain` (training combinations) or `und_heldout` (held-out combinations, every question
    type of every image, no captions), each from its own stream."""
    if name not in (UND, UND_HELDOUT):
        raise ValueError(f"unknown understanding dataset {name!r}; expected {UND} or {UND_HELDOUT}")
    heldout = name == UND_HELDOUT
    world = dataset_world(cfg, name, "heldout" if heldout else "train")
    n = cfg.sizes.und_heldout if heldout else cfg.sizes.und_pretrain
    prefix = "undh" if heldout else "und"
    return [understanding_case(world, f"{prefix}_{i:06d}", heldout=heldout) for i in range(n)]
