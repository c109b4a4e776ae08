"""SRUM dense reward map (SRUM Sec. 3.2): regional and global judgments -> one weight per pixel.

Construction, as the paper's released training data loader does it:

1. start from the neutral value 0.5 everywhere (unjudged pixels neither pulled nor pushed);
2. each region lifts its box, clamped to the image, to ``max(current, (score + 1) / 2)``;
   overlapping boxes keep the best judgment a pixel received;
3. the whole map is multiplied by the global layout factor ``(global + 1) / 2`` in [0, 1].
   The global score is normalised to [0, 1] (not kept signed) so that a bad layout and a bad region
   cannot multiply into a spurious positive reward (SRUM Sec. 3.2 / Appendix D).

A record with no ``global_layout_reward`` entry (or an unusable one) is treated as a neutral global
judgment, score 0 -> factor 0.5: the paper's scoring guide calls 0 "perfectly neutral", and its released
loader falls back to 0.0 in that case. A factor of 1 would instead treat "not judged" as "perfect layout".

Boxes are ``[x0, y0, x1, y1]`` in pixels with x1/y1 exclusive (as ``data.scene.Placement``); fractional
coordinates are rounded to the nearest pixel boundary. Malformed entries are skipped with a
``RewardEntryWarning`` naming the entry, never silently and never fatally: one bad line from a judge must
not cost a whole round.
"""
from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from data.render import area_weights

NEUTRAL = 0.5
GLOBAL_OBJECT = "global_layout_reward"


class RewardEntryWarning(UserWarning):
    """A reward entry (region or global score) was malformed and skipped."""


def _describe(index: int, entry: Any) -> str:
    obj = entry.get("object") if isinstance(entry, dict) else None
    return f"vlm_rewards[{index}] (object={obj!r})"


def _valid_score(value: Any) -> float | None:
    # bool is an int subclass; a judge answering True/False is malformed, not a score of 1/0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    score = float(value)
    if math.isnan(score) or not -1.0 <= score <= 1.0:
        return None
    return score


def score_to_unit(score: float) -> float:
    """A judge score in [-1, 1] as a map value in [0, 1] (neutral 0 -> 0.5)."""
    return (score + 1.0) / 2.0


def _clamped_box(bbox: Any, width: int, height: int) -> tuple[int, int, int, int] | str:
    """Pixel box clamped to the image, or the reason it is unusable."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox must be 4 numbers [x0, y0, x1, y1], got {bbox!r}"
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) for v in bbox):
        return f"bbox must be 4 finite numbers, got {bbox!r}"
    x0, y0, x1, y1 = (int(round(float(v))) for v in bbox)
    x0, x1 = max(0, x0), min(width, x1)
    y0, y1 = max(0, y0), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        return f"bbox {list(bbox)} is empty once clamped to the {width}x{height} image"
    return x0, y0, x1, y1


def split_rewards(vlm_rewards: Sequence[dict], width: int, height: int, *, warn: bool = True
                  ) -> tuple[float | None, list[tuple[tuple[int, int, int, int], float]]]:
    """Validate a ``vlm_rewards`` list: (global score or None, [(clamped box, score), ...])."""
    global_score: float | None = None
    seen_global = False
    regions: list[tuple[tuple[int, int, int, int], float]] = []

    def skip(i: int, entry: Any, why: str) -> None:
        if warn:
            warnings.warn(f"skipping {_describe(i, entry)}: {why}", RewardEntryWarning, stacklevel=3)

    for i, entry in enumerate(vlm_rewards or ()):
        if not isinstance(entry, dict):
            skip(i, entry, f"expected a dict with object/bbox/score, got {type(entry).__name__}")
            continue
        score = _valid_score(entry.get("score"))
        if entry.get("object") == GLOBAL_OBJECT:
            if seen_global:
                skip(i, entry, "a second global_layout_reward; the first one is used")
                continue
            seen_global = True
            if score is None:
                skip(i, entry, f"global score must be a number in [-1, 1], got {entry.get('score')!r}; "
                               "treated as neutral (0)")
                continue
            global_score = score
            continue
        if score is None:
            skip(i, entry, f"score must be a number in [-1, 1], got {entry.get('score')!r}")
            continue
        box = _clamped_box(entry.get("bbox"), width, height)
        if isinstance(box, str):
            skip(i, entry, box)
            continue
        regions.append((box, score))
    return global_score, regions


def reward_map(vlm_rewards: Sequence[dict], width: int, height: int) -> np.ndarray:
    """Dense SRUM reward map, float32 [height, width] with values in [0, 1] (see module docstring)."""
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"reward_map: width and height must be positive, got {width}x{height}")
    global_score, regions = split_rewards(vlm_rewards, int(width), int(height))
    if global_score is None and not any(isinstance(e, dict) and e.get("object") == GLOBAL_OBJECT
                                        for e in vlm_rewards or ()):
        warnings.warn(f"no {GLOBAL_OBJECT!r} entry among {len(vlm_rewards or ())} rewards; the layout is "
                      "treated as neutral (score 0, factor 0.5)", RewardEntryWarning, stacklevel=2)
    rmap = np.full((int(height), int(width)), NEUTRAL, dtype=np.float32)
    for (x0, y0, x1, y1), score in regions:
        np.maximum(rmap[y0:y1, x0:x1], score_to_unit(score), out=rmap[y0:y1, x0:x1])
    return rmap * np.float32(score_to_unit(0.0 if global_score is None else global_score))


def to_latent_grid(rmap: np.ndarray, grid: int | tuple[int, int]) -> np.ndarray:
    """Area-average a [H, W] map (or a stack [..., H, W]) down to the latent token grid.

    ``grid`` is the latent token grid (rows, cols), e.g. a pipeline's ``latent_grid``, or one side of a square one.
    Exact box averaging when the grid divides the image; otherwise each pixel contributes by its overlap.
    """
    rmap = np.asarray(rmap, dtype=np.float64)
    if rmap.ndim < 2:
        raise ValueError(f"to_latent_grid: expected a [H, W] map, got shape {rmap.shape}")
    rows, cols = (grid, grid) if isinstance(grid, numbers.Integral) else tuple(grid)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"to_latent_grid: grid must be positive, got {grid!r}")
    h, w = rmap.shape[-2:]
    if rows > h or cols > w:
        raise ValueError(f"to_latent_grid: grid {rows}x{cols} is finer than the {h}x{w} map")
    out = area_weights(h, rows) @ rmap @ area_weights(w, cols).T
    return out.astype(np.float32)


def reward_stats(maps: Iterable[np.ndarray] | np.ndarray, regions: Iterable[Any]) -> dict:
    """Round statistics: mean/std of R over all map cells, fraction of judged regions below neutral.

    ``regions`` may be region dicts or per-candidate ``vlm_rewards`` lists; the global entries and
    malformed ones are ignored. A region is below neutral when its score < 0 (map value < 0.5).
    With no regions the fraction is reported as 0.0 (``num_regions`` = 0 says why).
    """
    arrays = [np.asarray(m, dtype=np.float64).ravel() for m in (maps if not isinstance(maps, np.ndarray) else [maps])]
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    scores: list[float] = []
    for item in regions:
        entries = item if isinstance(item, (list, tuple)) else [item]
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("object") == GLOBAL_OBJECT:
                continue
            score = _valid_score(entry.get("score"))
            if score is not None:
                scores.append(score)
    below = sum(s < 0.0 for s in scores)
    return {
        "reward_mean": float(values.mean()) if values.size else 0.0,
        "reward_std": float(values.std()) if values.size else 0.0,
        "num_regions": len(scores),
        "regions_below_neutral": int(below),
        "frac_regions_below_neutral": below / len(scores) if scores else 0.0,
    }


def _read_records(path: Path) -> list[dict]:
    """Records through the format's validating reader; a file with malformed entries is read leniently
    instead (with a warning listing them), so that reward_map skips those entries one by one."""
    from data.formats.jsonl import read_jsonl
    from data.formats.srum_rewards import RewardFileError, read_rewards

    try:
        return read_rewards(path)
    except RewardFileError as e:
        warnings.warn(f"{e}\nreading it leniently: malformed entries are skipped", RewardEntryWarning, stacklevel=3)
    return read_jsonl(path)


def reward_maps_from_jsonl(path: str | Path, width: int, height: int) -> np.ndarray:
    """Reward map of every record of a SRUM reward JSONL: float32 [N, height, width]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward file {path} does not exist; write it with data.formats.srum_rewards")
    records = _read_records(path)
    maps = []
    for n, rec in enumerate(records):
        rewards = rec.get("vlm_rewards") if isinstance(rec, dict) else None
        if not isinstance(rewards, list):
            raise ValueError(f"{path}: record {n} has no 'vlm_rewards' list")
        maps.append(reward_map(rewards, width, height))
    return np.stack(maps) if maps else np.zeros((0, int(height), int(width)), dtype=np.float32)
