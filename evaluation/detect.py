"""Colour-blob subject detection on (possibly blurry) images of the subject world.

Every subject of a case has its own body colour from `data.scene.COLOURS`, so a subject is found by
its colour: each pixel is classified to the nearest colour the renderer can emit (subject body colours,
their darker texture shade, sky/ground colours of every scene, the skin and dark part colours).

Rules (sizes in pixels of a 32 x 32 image; distances Euclidean in RGB 0-255):

1. membership: a pixel whose nearest palette colour is the body or shade of subject colour c belongs to
   c with weight 1 at distance <= `full_dist` (30), falling linearly to 0 at `zero_dist` (80). Shade
   pixels are texture marks of c, not another subject.
2. density: each colour's membership is averaged over a 3 x 3 window; pixels with density >= 0.4 form
   the colour's mask. A crisp solid shape passes through unchanged (its corner pixels have density
   4/9, the pixels just outside an edge 3/9), while scattered noise pixels (a random image puts
   roughly one pixel in ten near each colour) are dropped, and blurry blobs keep their core.
3. blobs: 8-connected components of each mask; components smaller than `min_area` (6 px, scaled with
   the image area) are dropped: white noise leaves specks of at most 5 px, a small subject covers ~20.

Each detection carries its colour, bbox (x0, y0, x1, y1; x1/y1 exclusive, as data.scene.Placement),
area (pixels), soft area (membership sum: partial credit for washed-out blobs), mask, mean RGB and
the share of texture-mark pixels. Thresholds are deliberately generous: the judge grades how close a
blob comes to the ground truth; detection only has to find it.

Matching, shared by every reader of generated images that knows the ground truth (the oracle judge and
SRUM's oracle reward in evaluation.judges, T2I accuracy in evaluation.t2i): `ground_truth_blobs` (the blobs of
the rendered target, each with its placement), `variant_blob` (one placement re-rendered with another
category or texture: what the wrong shape or texture would look like) and `match_one_to_one`. The thresholds
they all read are named here once: `PRESENCE_FRACTION` (a blob stands for a subject when it covers this share
of the subject's expected area) and the silhouette ramp `SHAPE_IOU_FULL` / `SHAPE_IOU_ZERO`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from data.render import palette as render_palette
from data.render import render_array
from data.scene import COLOURS, Placement, Scene

FULL_DIST = 30.0
ZERO_DIST = 80.0
DENSITY = 0.4
MIN_AREA_32 = 6
PRESENCE_FRACTION = 0.3  # a blob stands for a subject at this share of its expected (ground-truth) area
SHAPE_IOU_FULL = 0.95  # silhouette agreement (aligned_mask_iou) that earns full shape credit ...
SHAPE_IOU_ZERO = 0.45  # ... and the one that earns none (a circle in a square's box reaches ~0.8)
TEXTURE_DIFF_ZERO = 0.3  # texture_similarity falls to 0 at this mark-share + row-structure difference


@dataclass(frozen=True)
class PaletteEntry:
    name: str
    rgb: tuple[int, int, int]
    owner: str | None  # subject colour this entry belongs to (body or shade); None for background/parts
    mark: bool = False  # a texture-mark shade


@lru_cache(maxsize=1)
def palette() -> tuple[PaletteEntry, ...]:
    """Every colour the renderer can emit (data.render.palette), as classification targets."""
    out = []
    for name, rgb in render_palette().items():
        base = name[: -len("_shade")] if name.endswith("_shade") else name
        owner = base if base in COLOURS else None
        out.append(PaletteEntry(name, tuple(int(c) for c in rgb), owner, mark=owner is not None and base != name))
    return tuple(out)


def to_array(image) -> np.ndarray:
    """HxWx3 uint8 array from a PIL image or an array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0 + 1e-6:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def resize_to(image: np.ndarray, size: int) -> np.ndarray:
    """Square-resize (bilinear) so that generated and ground-truth images compare pixel by pixel."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def ramp(d: np.ndarray | float, full: float, zero: float) -> np.ndarray | float:
    """1 at d <= full, 0 at d >= zero, linear between."""
    return np.clip((zero - np.asarray(d, dtype=float)) / (zero - full), 0.0, 1.0)


@dataclass
class PixelClasses:
    """Per-pixel classification of an image against the palette."""

    nearest: np.ndarray  # HxW index into palette()
    distance: np.ndarray  # HxW distance to that entry
    membership: dict[str, np.ndarray] = field(default_factory=dict)  # subject colour -> HxW weight in [0, 1]
    marks: dict[str, np.ndarray] = field(default_factory=dict)  # subject colour -> HxW texture-mark pixels


def classify(image, full_dist: float = FULL_DIST, zero_dist: float = ZERO_DIST) -> PixelClasses:
    arr = to_array(image).astype(np.float32)
    entries = palette()
    cols = np.array([e.rgb for e in entries], dtype=np.float32)
    dist = np.linalg.norm(arr[:, :, None, :] - cols[None, None], axis=-1)
    nearest = dist.argmin(axis=-1)
    d = np.take_along_axis(dist, nearest[..., None], axis=-1)[..., 0]
    weight = ramp(d, full_dist, zero_dist)
    out = PixelClasses(nearest=nearest, distance=d)
    for colour in COLOURS:
        idx = [i for i, e in enumerate(entries) if e.owner == colour]
        mark_idx = [i for i in idx if entries[i].mark]
        hit = np.isin(nearest, idx)
        out.membership[colour] = np.where(hit, weight, 0.0)
        out.marks[colour] = np.isin(nearest, mark_idx) & (weight > 0)
    return out


@dataclass
class Detection:
    colour: str
    mask: np.ndarray = field(repr=False)  # HxW bool: the blob
    marks: np.ndarray = field(repr=False)  # HxW bool: its texture-mark (shade) pixels
    soft_area: float  # membership sum over the blob
    mean_rgb: tuple[float, float, float]

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    @property
    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())

    @property
    def mark_fraction(self) -> float:
        """Share of the blob's pixels that are texture marks."""
        return float((self.marks & self.mask).sum() / max(self.area, 1))

    @property
    def row_profile(self) -> np.ndarray:
        """Mark share per row of the blob's bbox (stripes show up here)."""
        x0, y0, x1, y1 = self.bbox
        m = self.mask[y0:y1, x0:x1]
        return (self.marks[y0:y1, x0:x1] & m).sum(axis=1) / np.maximum(m.sum(axis=1), 1)


def merge(detections: list[Detection]) -> Detection:
    """One detection covering several blobs of the same colour (a subject split in pieces)."""
    if not detections:
        raise ValueError("merge() needs at least one detection")
    if len({d.colour for d in detections}) > 1:
        raise ValueError(f"merge() of different colours {sorted({d.colour for d in detections})}")
    if len(detections) == 1:
        return detections[0]
    areas = np.array([d.area for d in detections], dtype=float)
    rgb = np.array([d.mean_rgb for d in detections]) * areas[:, None]
    return Detection(
        colour=detections[0].colour,
        mask=np.logical_or.reduce([d.mask for d in detections]),
        marks=np.logical_or.reduce([d.marks for d in detections]),
        soft_area=float(sum(d.soft_area for d in detections)),
        mean_rgb=tuple(float(v) for v in rgb.sum(axis=0) / areas.sum()),
    )


def min_area_for(height: int, width: int) -> int:
    return max(MIN_AREA_32, round(MIN_AREA_32 * height * width / 1024))


def detect(
    image,
    *,
    colours=None,
    full_dist: float = FULL_DIST,
    zero_dist: float = ZERO_DIST,
    density: float = DENSITY,
    min_area: int | None = None,
    connected: bool = True,
) -> list[Detection]:
    """Colour blobs of the subject colours in `image`, largest first.

    connected=False gives one detection per colour (all its components of at least `min_area` pixels
    together): the view of a subject split in two by an occluder in a ground-truth render."""
    from scipy import ndimage  # here, not at the top: evaluation.config reads this module's thresholds cheaply

    arr = to_array(image)
    h, w = arr.shape[:2]
    min_area = min_area_for(h, w) if min_area is None else min_area
    classes = classify(arr, full_dist, zero_dist)
    found: list[Detection] = []
    eight = np.ones((3, 3), dtype=bool)
    for colour in colours or COLOURS:
        if colour not in classes.membership:
            raise ValueError(f"unknown subject colour {colour!r}; expected one of {sorted(COLOURS)}")
        member = classes.membership[colour]
        if not member.any():
            continue
        dens = ndimage.uniform_filter(member, size=3, mode="nearest")
        labels, n = ndimage.label(dens >= density - 1e-9, structure=eight)
        masks = [labels == k for k in range(1, n + 1)]
        masks = [m for m in masks if m.sum() >= min_area]
        if not connected and masks:
            masks = [np.logical_or.reduce(masks)]
        for mask in masks:
            found.append(
                Detection(
                    colour=colour,
                    mask=mask,
                    marks=classes.marks[colour] & mask,
                    soft_area=float(member[mask].sum()),
                    mean_rgb=tuple(float(v) for v in arr[mask].mean(axis=0)),
                )
            )
    found.sort(key=lambda d: -d.area)
    return found


def by_colour(detections: list[Detection]) -> dict[str, list[Detection]]:
    out: dict[str, list[Detection]] = {}
    for d in detections:
        out.setdefault(d.colour, []).append(d)
    return out


def bbox_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def aligned_mask_iou(a: Detection, b: Detection) -> float:
    """Shape agreement: IoU of a's silhouette, rescaled onto b's bbox, with b's silhouette."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    crop = a.mask[ay0:ay1, ax0:ax1].astype(np.uint8) * 255
    scaled = np.asarray(Image.fromarray(crop).resize((bx1 - bx0, by1 - by0), Image.NEAREST)) > 127
    ref = b.mask[by0:by1, bx0:bx1]
    union = (scaled | ref).sum()
    return float((scaled & ref).sum() / union) if union else 0.0


def texture_similarity(a: Detection, b: Detection) -> float:
    """1 for the same texture pattern, falling to 0 as the mark share and the row structure differ.

    The row profile (mark share per bbox row) is compared after resampling to a common length:
    stripes are alternating rows, dots a sparse regular pattern, plain texture all zeros."""
    n = 16
    pa = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, max(len(a.row_profile), 2)), _pad(a.row_profile))
    pb = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, max(len(b.row_profile), 2)), _pad(b.row_profile))
    diff = abs(a.mark_fraction - b.mark_fraction) + abs(pa.std() - pb.std())
    return float(np.clip(1.0 - diff / TEXTURE_DIFF_ZERO, 0.0, 1.0))


def _pad(p: np.ndarray) -> np.ndarray:
    return np.repeat(p, 2) if len(p) == 1 else p


# ---------------------------------------------------------------- matching against the ground truth


@lru_cache(maxsize=1024)
def ground_truth_blobs(scene_json: str) -> tuple[tuple[Detection, int], ...]:
    """Blobs of the rendered scene, largest first, each with the index of the placement of its colour it
    overlaps most (what the ground truth shows of every subject)."""
    from data.render import subject_mask

    scene = Scene.from_json(scene_json)
    masks = [subject_mask(scene, i) for i in range(len(scene.placements))]
    out = []
    for d in detect(render_array(scene)):
        overlap = [(m & d.mask).sum() if scene.placements[i].subject.colour == d.colour else -1
                   for i, m in enumerate(masks)]
        out.append((d, int(np.argmax(overlap))))
    return tuple(out)


@lru_cache(maxsize=4096)
def variant_blob(scene_json: str, index: int, category: str, texture: str) -> Detection | None:
    """Placement `index` rendered alone with another category / texture, same box and colour: the blob a
    wrong shape or texture would make."""
    scene = Scene.from_json(scene_json)
    p = scene.placements[index]
    alone = Scene(scene.background, (Placement(replace(p.subject, category=category, texture=texture), p.bbox),),
                  scene.size)
    blobs = detect(render_array(alone), colours=[p.subject.colour], connected=False)
    return blobs[0] if blobs else None


def match_one_to_one(gt: Sequence[Detection], found: Sequence[Detection],
                     min_fraction: float = PRESENCE_FRACTION) -> dict[int, int]:
    """found index -> gt index, one-to-one within each colour: best bbox IoU first, then the larger blob, then
    the earlier found blob; a blob smaller than `min_fraction` of the ground-truth area matches nothing."""
    pairs = sorted(
        ((bbox_iou(g.bbox, f.bbox), f.area, -fi, gi)
         for fi, f in enumerate(found) for gi, g in enumerate(gt) if g.colour == f.colour),
        reverse=True,
    )
    out: dict[int, int] = {}
    used: set[int] = set()
    for _, area, neg_fi, gi in pairs:
        fi = -neg_fi
        if fi in out or gi in used or area < min_fraction * gt[gi].area:
            continue
        out[fi] = gi
        used.add(gi)
    return out
