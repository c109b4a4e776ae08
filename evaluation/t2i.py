"""Compositional text-to-image accuracy, T2I-CompBench style, on the subject world's SRUM prompts.

Each prompt row carries its exact target scene, so the oracle can check every attribute the prompt
names. Ground-truth instances are the colour blobs of the rendered target (evaluation.detect, the
same detector that reads the generated image). A ground-truth instance is *found* when a generated
blob of its colour (matched one-to-one, best bbox overlap first, then the largest) covers at least
PRESENCE_FRACTION (30%, evaluation.detect) of its area. On a found instance:

- shape_ok: the generated blob's silhouette is at least as close to the true category's silhouette as
  to every other category's (each rendered in the same box, colour and texture), and close enough
  (similarity >= 0.5); similarity = aligned silhouette IoU x ratio of bbox widths x ratio of heights;
- texture_ok: likewise for the texture (stripes, dots, plain) against the other textures.

Per-image score in [0, 1] by category (the fraction of checks that pass):

- colour:      found and shape_ok for every instance. In this world an object is located by its colour,
               so "the circle is red" means "the red blob is a circle": colour binding and shape
               binding become the same check; shape uses it too.
- shape:       found and shape_ok.
- texture:     found and texture_ok.
- spatial:     for each pair of instances whose centres differ by more than 2 px in the ground truth, the
               generated centres are ordered the same way along the pair's main axis (both found).
- numeracy:    per colour, the number of generated blobs of at least PRESENCE_FRACTION of the colour's median
               instance area equals the ground-truth count.
- non-spatial: found, shape_ok and texture_ok (full attribute binding; the pairing words of these
               prompts set no layout, so none is checked).
- complex:     the mean of the non-spatial, spatial (when the scene has a pair) and numeracy scores.

Category accuracy is the mean score over that category's prompts; `mean` is over the categories.
Prompt rows are those of data.formats.srum_prompts (read_prompts): {key, category, prompt, target}.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, Sequence

import numpy as np

from data.scene import CHARACTER_CATEGORIES, OBJECT_CATEGORIES, TEXTURES, Scene
from evaluation.detect import (
    PRESENCE_FRACTION,
    Detection,
    aligned_mask_iou,
    bbox_iou,
    by_colour,
    detect,
    ground_truth_blobs,
    resize_to,
    texture_similarity,
    to_array,
    variant_blob,
)

CATEGORIES = ("colour", "shape", "texture", "spatial", "numeracy", "non-spatial", "complex")
ALL_CATEGORIES = OBJECT_CATEGORIES + CHARACTER_CATEGORIES
SPATIAL_MIN_PX = 2.0
_ALIASES = {"color": "colour", "nonspatial": "non-spatial", "non_spatial": "non-spatial", "non spatial": "non-spatial"}


def canonical_category(name: str) -> str:
    c = name.strip().lower()
    c = _ALIASES.get(c, c).replace("_", "-")
    if c not in CATEGORIES:
        raise ValueError(f"unknown T2I category {name!r}; expected one of {CATEGORIES}")
    return c


def row_target(row) -> Scene:
    """The target scene of a prompt row (a dict with a scene under 'target' as dict or JSON text)."""
    if isinstance(row, dict):
        for k in ("target", "target_scene", "scene"):
            if k in row and row[k] is not None:
                v = row[k]
                return v if isinstance(v, Scene) else Scene.from_dict(json.loads(v) if isinstance(v, str) else v)
        raise ValueError(f"prompt row {row.get('key', '?')}: no target scene (expected a 'target' field)")
    target = getattr(row, "target", None)
    if target is None:
        raise ValueError(f"prompt row {getattr(row, 'key', '?')}: no target scene")
    return target


def _field(row, name: str):
    return row[name] if isinstance(row, dict) else getattr(row, name)


def _shape_similarity(a: Detection, b: Detection) -> float:
    """Aligned silhouette IoU times the agreement of the bbox sides: a person's body-coloured part is a
    rectangle that, stretched onto a square's box, would match it perfectly; its proportions do not."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
    wa, ha, wb, hb = ax1 - ax0, ay1 - ay0, bx1 - bx0, by1 - by0
    return aligned_mask_iou(a, b) * min(wa, wb) / max(wa, wb) * min(ha, hb) / max(ha, hb)


def _match(gt: list[tuple[Detection, int]], gen: dict[str, list[Detection]]) -> dict[int, Detection]:
    """One-to-one matching per colour: best bbox IoU first, then the largest leftover blobs."""
    matched: dict[int, Detection] = {}
    for colour in {d.colour for d, _ in gt}:
        g_idx = [k for k, (d, _) in enumerate(gt) if d.colour == colour]
        cands = list(gen.get(colour, []))
        pairs = sorted(
            ((bbox_iou(gt[k][0].bbox, c.bbox), c.area, k, j) for k in g_idx for j, c in enumerate(cands)), reverse=True
        )
        used_g, used_c = set(), set()
        for iou, _, k, j in pairs:
            if k in used_g or j in used_c:
                continue
            if cands[j].area < PRESENCE_FRACTION * gt[k][0].area:
                continue
            matched[k] = cands[j]
            used_g.add(k)
            used_c.add(j)
    return matched


def score_image(target: Scene, image, category: str) -> dict:
    """Score of one generated image for a prompt of `category`, with every check behind it."""
    category = canonical_category(category)
    arr = resize_to(to_array(image), target.size)
    gt = list(ground_truth_blobs(target.to_json()))
    gen = by_colour(detect(arr))
    matched = _match(gt, gen)
    scene_json = target.to_json()

    checks = []
    for k, (g, i) in enumerate(gt):
        subject = target.placements[i].subject
        d = matched.get(k)
        c = {"subject": subject.name, "found": d is not None, "shape_ok": False, "texture_ok": False}
        if d is not None:
            shape_sim = {
                cat: _shape_similarity(d, v) if (v := variant_blob(scene_json, i, cat, subject.texture)) else 0.0
                for cat in ALL_CATEGORIES
            }
            tex_sim = {
                tex: texture_similarity(d, v) if (v := variant_blob(scene_json, i, subject.category, tex)) else 0.0
                for tex in TEXTURES
            }
            c["shape_ok"] = shape_sim[subject.category] >= max(shape_sim.values()) and shape_sim[subject.category] >= 0.5
            c["texture_ok"] = max(tex_sim, key=tex_sim.get) == subject.texture
        checks.append(c)

    pairs = []
    for a in range(len(gt)):
        for b in range(a + 1, len(gt)):
            (ga, _), (gb, _) = gt[a], gt[b]
            dx, dy = gb.centroid[0] - ga.centroid[0], gb.centroid[1] - ga.centroid[1]
            axis = 0 if abs(dx) >= abs(dy) else 1
            if max(abs(dx), abs(dy)) <= SPATIAL_MIN_PX:
                continue
            ok = False
            if a in matched and b in matched:
                delta = matched[b].centroid[axis] - matched[a].centroid[axis]
                ok = bool(np.sign(delta) == np.sign((dx, dy)[axis]) and abs(delta) > SPATIAL_MIN_PX / 2)
            pairs.append({"a": checks[a]["subject"], "b": checks[b]["subject"], "axis": "xy"[axis], "ok": ok})

    counts = []
    for colour in sorted({g.colour for g, _ in gt}):
        areas = [g.area for g, _ in gt if g.colour == colour]
        need = PRESENCE_FRACTION * float(np.median(areas))
        n_gen = sum(d.area >= need for d in gen.get(colour, []))
        counts.append({"colour": colour, "expected": len(areas), "generated": int(n_gen), "ok": n_gen == len(areas)})

    def frac(values: Iterable[bool]) -> float | None:
        values = list(values)
        return float(np.mean(values)) if values else None

    binding = frac(c["found"] and c["shape_ok"] and c["texture_ok"] for c in checks) or 0.0
    parts = {
        "colour": frac(c["found"] and c["shape_ok"] for c in checks),
        "shape": frac(c["found"] and c["shape_ok"] for c in checks),
        "texture": frac(c["found"] and c["texture_ok"] for c in checks),
        "spatial": frac(p["ok"] for p in pairs),
        "numeracy": frac(c["ok"] for c in counts),
        "non-spatial": binding,
    }
    complex_parts = [binding] + [parts[k] for k in ("spatial", "numeracy") if parts[k] is not None]
    parts["complex"] = float(np.mean(complex_parts))
    score = parts[category]
    if score is None:  # e.g. a spatial prompt whose subjects overlap in the ground truth
        score = binding
    return {"category": category, "score": float(score), "parts": parts, "subjects": checks, "pairs": pairs, "counts": counts}


def t2i_accuracy(rows: Sequence, images: Sequence) -> dict:
    """Per-category accuracy in [0, 1] and their mean, for generated `images` of prompt `rows`."""
    if len(rows) != len(images):
        raise ValueError(f"{len(rows)} prompt rows but {len(images)} images")
    per_prompt = []
    by_cat: dict[str, list[float]] = {}
    for row, image in zip(rows, images):
        cat = canonical_category(_field(row, "category"))
        result = score_image(row_target(row), image, cat)
        result["key"] = _field(row, "key")
        per_prompt.append(result)
        by_cat.setdefault(cat, []).append(result["score"])
    per_category = {c: float(np.mean(by_cat[c])) for c in CATEGORIES if c in by_cat}
    return {
        "per_category": per_category,
        "mean": float(np.mean(list(per_category.values()))) if per_category else float("nan"),
        "n": {c: len(by_cat[c]) for c in per_category},
        "per_prompt": per_prompt,
    }


def evaluate_t2i(generate_fn: Callable[[list, int], list[np.ndarray]], rows: Sequence, seed: int = 0) -> dict:
    """Generate one image per prompt (no reference images) and score them. All prompts go to
    generate_fn in one call, as in evaluation.runner (per-case noise comes from seed and position)."""
    from model.batching import Example

    examples = [Example(refs=[], instruction=_field(r, "prompt"), target=None, qa=[]) for r in rows]
    images = generate_fn(examples, seed)
    return t2i_accuracy(rows, images)
