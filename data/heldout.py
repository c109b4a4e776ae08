"""Held-out benchmark splits of the MICo and MIGE worlds: MICo-Bench and MIGE-Bench cases.

Like `sconeeval_bench`, each is drawn from its own stream over the held-out (category, colour, texture) quarter of
the world (data.world.HELD_OUT_COMBOS), so no benchmark subject appears in any training row.

- `mico_bench`: `data.sizes.mico_bench_per_task` cases for each of MICo's seven sub-tasks and for De&Re, in
  MICo-Bench's four task groups (Object, Person, HOI, De&Re; MICo-150K Sec. 4.3). A sub-task's composition type
  is drawn among those whose inputs fit `data.max_references` (the model's own input budget), so the sampler never
  has to drop a source.
- `mige_bench`: `data.sizes.mige_bench_per_edit` cases of instruction-based subject addition, then as many of
  replacement (MIGEBench's two halves, MIGE Sec. 4.2.3), each with its source scene, subject image, ground-truth
  edited image and the mask of the edited region (data.formats.mige_bench).

The layouts are written by data.formats.mico_bench and data.formats.mige_bench.
"""
from __future__ import annotations

from data.catalog import MICO_BENCH, MIGE_BENCH
from data.config import DataConfig
from data.records import Case
from data.world import dataset_world

# MICo-Bench's task groups over MICo-150K's sub-tasks (MICo-150K Sec. 3 and 4.3).
MICO_GROUP_OF = {
    "object_scene": "Object",
    "object_object": "Object",
    "person_person": "Person",
    "person_scene": "Person",
    "person_object": "HOI",
    "person_clothes": "HOI",
    "person_object_clothes": "HOI",
    "decompose_recompose": "De&Re",
}


def mico_input_limit(cfg: DataConfig) -> int:
    """How many source images a MICo-Bench case may hold: MICo's own limit, capped by data.max_references."""
    return min(cfg.max_references, cfg.mico_max_references)


def mico_bench_cases(cfg: DataConfig) -> list[Case]:
    """`mico_bench_per_task` cases per MICo sub-task (a fitting composition type drawn for each) and De&Re."""
    from data.mico import DE_RE, SUB_TASK_TYPES, MicoSampler, references_needed

    limit = mico_input_limit(cfg)
    if limit < 2:
        raise ValueError(f"MICo-Bench cases need at least 2 inputs; data.max_references is {cfg.max_references}")
    world = dataset_world(cfg, MICO_BENCH, "heldout")
    sampler = MicoSampler(world, limit)
    cases = []
    for sub_task, types in SUB_TASK_TYPES.items():
        fitting = [t for t in types if references_needed(t) <= limit]
        for i in range(cfg.sizes.mico_bench_per_task):
            cases.append(sampler.case(f"{sub_task}_{i:04d}", world.pick(fitting)))
    if references_needed(DE_RE) <= limit:
        cases += [sampler.case(f"de_re_{i:04d}", DE_RE) for i in range(cfg.sizes.mico_bench_per_task)]
    for case in cases:
        case.meta = case.meta | {"mico_group": MICO_GROUP_OF[case.task_type]}
    return cases


def mige_bench_cases(cfg: DataConfig) -> list[Case]:
    """`mige_bench_per_edit` subject-addition cases, then as many replacement cases; meta['idx'] numbers each
    half from 0, as MIGEBench names its files."""
    from data.mige import EDIT_TYPES, edit_case

    if cfg.max_references < 2:
        raise ValueError("MIGE-Bench cases have two inputs (subject and source); data.max_references must be >= 2")
    world = dataset_world(cfg, MIGE_BENCH, "heldout")
    cases = []
    for edit_type in EDIT_TYPES:
        for i in range(cfg.sizes.mige_bench_per_edit):
            case = edit_case(world, f"{edit_type}_{i:04d}", edit_type)
            case.meta = case.meta | {"idx": i}
            cases.append(case)
    return cases
