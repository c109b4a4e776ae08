"""Text-to-image rows: the stand-in for the T2I pretraining a unified base model brings along.

Scone and SRUM start from BAGEL, which already draws compositional scenes from text; SRUM's self-reward
only has something to refine because of that. Our tiny model starts from scratch, so the chain gives it that
competence the same way: Stage I mixes in `t2i_pretrain` rows (params.yaml, train.stages). They are
compositional prompts of the SRUM prompt world (data.formats.srum_prompts, all seven T2I-CompBench
categories) drawn from their own stream, written in the Scone-S2I layout with no references: the `image`
list holds only the target. Their yes/no questions about the target train the understanding expert too.
"""
from __future__ import annotations

from data.catalog import T2I
from data.config import DataConfig
from data.formats.srum_prompts import make_prompts
from data.records import Case
from data.scene import Scene
from data.world import dataset_world

TASK_TYPE = "text_to_image"


def t2i_cases(cfg: DataConfig) -> list[Case]:
    """cfg.sizes.t2i_pretrain prompt rows, categories in turn."""
    world = dataset_world(cfg, T2I, "train")
    cases = []
    for row in make_prompts(world, cfg.sizes.t2i_pretrain):
        case = Case(
            key=row["key"].replace("srum_", "t2i_"), task_type=TASK_TYPE, case_type=row["category"],
            instruction=row["prompt"], references=[], target=Scene.from_dict(row["target"]),
            subject_list=[], subject_label=[],
            meta={"category": row["category"], "layout_specified": row["layout_specified"]},
        )
        case.qa = world.qa(case)
        cases.append(case)
    return cases
