"""One sample of subject-driven generation (a SconeEval case or a training row) and its row form."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from data.render import encode_png, render
from data.scene import Scene

# The six SconeEval sub-tasks, in the order of the paper's Table 3.
TASK_TYPES = (
    "composition_single",
    "composition_multi",
    "distinction_cross",
    "distinction_intra",
    "distinction_composition_cross",
    "distinction_composition_intra",
)

# MICo-150K's seven sub-tasks (its Table 1) and its Decompose-and-Recompose track.
MICO_TASK_TYPES = (
    "object_scene",
    "object_object",
    "person_person",
    "person_scene",
    "person_object",
    "person_clothes",
    "person_object_clothes",
    "decompose_recompose",
)
# MIGE's instruction-based subject-driven editing sub-tasks.
MIGE_TASK_TYPES = ("subject_addition", "subject_replacement")
# Text-to-image rows (data.t2i): no references, the image list holds only the target.
T2I_TASK_TYPES = ("text_to_image",)
# Understanding rows (data.understanding): one image and questions about it; no generation target to learn.
UNDERSTANDING_TASK_TYPES = ("understanding",)
ALL_TASK_TYPES = (*TASK_TYPES, *MICO_TASK_TYPES, *MIGE_TASK_TYPES, *T2I_TASK_TYPES, *UNDERSTANDING_TASK_TYPES)

# Columns of a training shard (Scone-S2I-57K layout plus our metadata columns).
ROW_COLUMNS = (
    "image",
    "instruction",
    "key",
    "task_type",
    "case_type",
    "scene_graph",
    "subject_list",
    "subject_label",
    "qa",
    "meta",
)


@dataclass
class Case:
    """A sample: references, instruction and the exact target scene.

    subject_list[i]: referring phrases of the candidate subjects in reference i (one per candidate, in
    placement order); subject_label[i][j] = 1 when that candidate must appear in the output. Scene-only
    references have empty lists. `meta` holds build metadata (instruction plan, injected defect, ...).
    """

    key: str
    task_type: str
    case_type: str
    instruction: str
    references: list[Scene | None]
    target: Scene | None
    subject_list: list[list[str]]
    subject_label: list[list[int]]
    qa: list[tuple[str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task_type not in ALL_TASK_TYPES:
            raise ValueError(f"case {self.key}: unknown task_type {self.task_type!r}; expected one of {ALL_TASK_TYPES}")
        self.qa = [tuple(pair) for pair in self.qa]

    def scene_graph(self) -> dict:
        return {
            "references": [None if s is None else s.to_dict() for s in self.references],
            "target": None if self.target is None else self.target.to_dict(),
        }

    def images(self) -> list[bytes]:
        """PNG bytes of the references followed by the target (last), as in a Scone-S2I row."""
        if self.target is None or any(s is None for s in self.references):
            raise ValueError(f"case {self.key}: cannot render without scene graphs")
        return [encode_png(render(s)) for s in (*self.references, self.target)]

    def to_row(self) -> dict:
        """Row of a training shard; JSON columns are strings so plain pyarrow readers need no schema."""
        return {
            "image": self.images(),
            "instruction": self.instruction,
            "key": self.key,
            "task_type": self.task_type,
            "case_type": self.case_type,
            "scene_graph": json.dumps(self.scene_graph(), sort_keys=True),
            "subject_list": json.dumps(self.subject_list),
            "subject_label": json.dumps(self.subject_label),
            "qa": json.dumps([list(p) for p in self.qa]),
            "meta": json.dumps(self.meta, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict) -> "Case":
        """Inverse of `to_row` (images are ignored: the scene graph is the ground truth)."""
        missing = [c for c in ROW_COLUMNS if c != "image" and c not in row]
        if missing:
            raise ValueError(
                f"row {row.get('key', '?')}: missing metadata columns {missing}; "
                "only shards written by data.formats.scone_s2i carry scene graphs"
            )
        graph = json.loads(row["scene_graph"])
        return cls(
            key=row["key"],
            task_type=row["task_type"],
            case_type=row["case_type"],
            instruction=row["instruction"],
            references=[None if s is None else Scene.from_dict(s) for s in graph["references"]],
            target=None if graph["target"] is None else Scene.from_dict(graph["target"]),
            subject_list=json.loads(row["subject_list"]),
            subject_label=json.loads(row["subject_label"]),
            qa=[tuple(p) for p in json.loads(row["qa"])],
            meta=json.loads(row["meta"]) if row.get("meta") else {},
        )


def case_type_of(domains: list[str]) -> str:
    """SconeEval case type from the domain of each reference ('character' | 'object' | 'scene'): '1C2O1S'."""
    counts = {d: domains.count(d) for d in ("character", "object", "scene")}
    unknown = set(domains) - set(counts)
    if unknown:
        raise ValueError(f"unknown reference domains {sorted(unknown)}")
    return "".join(f"{n}{letter}" for (d, n), letter in zip(counts.items(), "COS") if n)
