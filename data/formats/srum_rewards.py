"""SRUM regional-reward records: one JSON object per line with a `vlm_rewards` list.

Each reward is {"object": str, "bbox": [x0, y0, x1, y1], "score": float, "reason": str (optional)}; the entry
whose object is "global_layout_reward" carries the global layout score (its bbox may be null or absent).
Scores follow SRUM's scoring guides: -1.0 (contradicts the prompt) .. 1.0 (perfect). Other keys of a
record (key, prompt, image path, ...) pass through untouched.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data.formats.jsonl import iter_jsonl

GLOBAL_OBJECT = "global_layout_reward"


class RewardFileError(ValueError):
    """A reward file has malformed lines; the message lists each with its line number."""


class RegionReward(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: str = Field(min_length=1)
    bbox: list[float] | None = None
    score: float = Field(ge=-1.0, le=1.0)
    reason: str | None = None

    @field_validator("bbox")
    @classmethod
    def _box(cls, v):
        if v is None:
            return v
        if len(v) != 4:
            raise ValueError(f"bbox needs 4 numbers [x0, y0, x1, y1], got {len(v)}")
        if v[2] < v[0] or v[3] < v[1]:
            raise ValueError(f"bbox {v} has x1 < x0 or y1 < y0")
        return v

    @model_validator(mode="after")
    def _local_needs_box(self):
        if self.object != GLOBAL_OBJECT and self.bbox is None:
            raise ValueError(f"regional reward for {self.object!r} has no bbox")
        return self


class RewardRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    vlm_rewards: list[RegionReward]

    @model_validator(mode="after")
    def _one_global(self):
        n = sum(r.object == GLOBAL_OBJECT for r in self.vlm_rewards)
        if n > 1:
            raise ValueError(f"{n} entries named {GLOBAL_OBJECT!r}; at most one global reward per record")
        return self


def _dump(record: RewardRecord) -> dict:
    return record.model_dump(exclude_none=True)  # a null bbox / reason reads back as absent


def write_rewards(path: str | Path, records: Iterable[dict | RewardRecord]) -> Path:
    """Validate and write records, one per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, rec in enumerate(records):
        try:
            model = rec if isinstance(rec, RewardRecord) else RewardRecord.model_validate(rec)
        except ValidationError as e:
            raise RewardFileError(f"record {i}: {_first_errors(e)}") from None
        lines.append(json.dumps(_dump(model), sort_keys=True))
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _first_errors(e: ValidationError, n: int = 3) -> str:
    parts = []
    for err in e.errors()[:n]:
        where = ".".join(str(x) for x in err["loc"]) or "record"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def read_rewards(path: str | Path) -> list[dict]:
    """Validated records as dicts (optional fields that were null are dropped). Malformed lines raise
    RewardFileError naming every bad line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reward file {path} not found")
    out, bad = [], []
    for n, value in iter_jsonl(path, on_bad_line=lambda n, _, why: bad.append(f"  line {n}: not valid JSON ({why})")):
        try:
            out.append(_dump(RewardRecord.model_validate(value)))
        except ValidationError as e:
            bad.append(f"  line {n}: {_first_errors(e)}")
    if bad:
        raise RewardFileError(f"{path}: {len(bad)} malformed line(s)\n" + "\n".join(bad))
    return out
