"""MIGE's instruction-based subject-driven editing over the subject world: subject addition and replacement.

A row edits a source scene (MIGE's conditional input: the source image, where generation starts from a
blank canvas) with a multimodal instruction whose `<imagehere>` placeholders stand for the input images in
order (MIGE Sec. 3.3, Appendix B):

    addition     "add <imagehere> on the left of <imagehere>"         images: subject, source, target
    replacement  "replace the red circle in <imagehere> with <imagehere>"  images: source, subject, target

Subjects of the source keep their place in the target (input-output consistency of editing). The source
entry is a canvas, not a pool of candidates: its subject_list is empty. meta records `edit_type`,
`source_image` (0-based index of the source in `image` / references), `conditional_input` and, for
replacement, the uid of the replaced subject.
"""
from __future__ import annotations

from data.catalog import MIGE
from data.config import DataConfig
from data.instructions import IMAGE_PLACEHOLDER, edit_instruction, referring_phrase, unique_cues
from data.records import Case, case_type_of
from data.scene import SCENES
from data.world import EXTRA_COLOUR_SHARE, LAYOUTS, ROW_LAYOUT, Exhausted, World, dataset_world, layout_scene

EDIT_TYPES = ("addition", "replacement")
TASK_OF = {"addition": "subject_addition", "replacement": "subject_replacement"}


def _subject_reference(world: World, subject):
    return layout_scene(world.pick(list(SCENES)), [subject], ["center"], "single", world.image_size)


def _finish(world: World, case: Case) -> Case:
    if case.instruction.count(IMAGE_PLACEHOLDER) != len(case.references):
        raise AssertionError(f"case {case.key}: placeholders do not match its {len(case.references)} inputs")
    case.qa = world.qa(case)
    return case


def addition_case(world: World, key: str) -> Case:
    used: set[str] = set()
    n_source = int(world.rng.integers(1, 3))
    layout = ROW_LAYOUT[n_source + 1]
    slots = world.permutation(list(LAYOUTS[layout]))[: n_source + 1]
    subjects = []
    for _ in range(n_source + 1):
        s = world.subject(used)
        used.add(s.colour)
        subjects.append(s)
    *kept, new = subjects
    background = world.pick(list(SCENES))
    size = world.image_size
    source = layout_scene(background, kept, slots[:-1], layout, size)
    target = layout_scene(background, subjects, slots, layout, size)
    phrase = referring_phrase(unique_cues([(new, "center")], 0, world.rng, extra_colour=EXTRA_COLOUR_SHARE), new.domain)
    case = Case(
        key=key,
        task_type=TASK_OF["addition"],
        case_type=case_type_of([new.domain, "scene"]),
        instruction=edit_instruction("addition", slot=slots[-1]),
        references=[_subject_reference(world, new), source],
        target=target,
        subject_list=[[phrase], []],
        subject_label=[[1], []],
        meta={"edit_type": "addition", "source_image": 1, "conditional_input": "source_image", "slot": slots[-1]},
    )
    return _finish(world, case)


def replacement_case(world: World, key: str) -> Case:
    used: set[str] = set()
    n_source = int(world.rng.integers(1, 4))
    layout = ROW_LAYOUT[n_source]
    slots = world.permutation(list(LAYOUTS[layout]))[:n_source]
    source_subjects = []
    for _ in range(n_source):
        s = world.subject(used)
        used.add(s.colour)
        source_subjects.append(s)
    new = world.subject(used)
    j = int(world.rng.integers(n_source))
    background = world.pick(list(SCENES))
    size = world.image_size
    source = layout_scene(background, source_subjects, slots, layout, size)
    # the phrase must single the replaced subject out among the source's subjects (step 1 of Scone)
    old_phrase = referring_phrase(unique_cues(list(zip(source_subjects, slots)), j, world.rng), source_subjects[j].domain)
    edited = list(source_subjects)
    edited[j] = new
    target = layout_scene(background, edited, slots, layout, size)
    new_phrase = referring_phrase(unique_cues([(new, "center")], 0, world.rng, extra_colour=EXTRA_COLOUR_SHARE), new.domain)
    case = Case(
        key=key,
        task_type=TASK_OF["replacement"],
        case_type=case_type_of([new.domain, "scene"]),
        instruction=edit_instruction("replacement", phrase=old_phrase),
        references=[source, _subject_reference(world, new)],
        target=target,
        subject_list=[[], [new_phrase]],
        subject_label=[[], [1]],
        meta={"edit_type": "replacement", "source_image": 0, "conditional_input": "source_image",
              "replaced": source_subjects[j].uid, "slot": slots[j]},
    )
    return _finish(world, case)


def edit_case(world: World, key: str, edit_type: str) -> Case:
    make = {"addition": addition_case, "replacement": replacement_case}[edit_type]
    for _ in range(100):
        try:
            return make(world, key)
        except Exhausted:
            continue
    raise RuntimeError(f"could not draw a MIGE {edit_type} case")


def mige_cases(cfg: DataConfig) -> list[Case]:
    """cfg.sizes.mige_edit rows, addition and replacement in turn (MIGE samples them 1:1)."""
    if cfg.max_references < 2:
        raise ValueError("mige_edit rows have two inputs (subject and source); data.max_references must be >= 2")
    world = dataset_world(cfg, MIGE, "train")
    return [edit_case(world, f"mige_{i:06d}", EDIT_TYPES[i % 2]) for i in range(cfg.sizes.mige_edit)]
