"""Rasterise scene graphs of the subject world.

Pixels are exact: no antialiasing, every pixel is one of the background colours, a subject colour, the
darker shade of a subject colour (texture), or one of the fixed part colours below. The oracle judge in
`evaluation` classifies generated pixels against exactly these colours.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from data.scene import COLOURS, SCENES, Scene

SKY_FRACTION = 0.55  # top part of the canvas is sky, the rest is ground
SKIN = (235, 195, 160)  # person heads
DARK = (35, 35, 35)  # legs, antennas, robot eyes
SHADE_FACTOR = 0.6  # texture marks are the subject colour darkened by this factor

# Part labels in a subject's label map.
_EMPTY, _BODY, _SKIN, _DARK = 0, 1, 2, 3


def shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Colour of the stripes / dots drawn on a subject of colour `rgb`."""
    return tuple(int(c * SHADE_FACTOR) for c in rgb)


def palette() -> dict[str, tuple[int, int, int]]:
    """Every colour the renderer can emit, by name (for pixel classification by the oracle judge)."""
    out: dict[str, tuple[int, int, int]] = {}
    for name, rgb in COLOURS.items():
        out[name] = rgb
        out[f"{name}_shade"] = shade(rgb)
    for name, (sky, ground) in SCENES.items():
        out[f"{name}_sky"] = sky
        out[f"{name}_ground"] = ground
    out["skin"] = SKIN
    out["dark"] = DARK
    return out


def _draw(size: tuple[int, int], paint) -> np.ndarray:
    """Draw with PIL on a single-channel canvas of `size` (w, h) and return it as uint8 labels."""
    img = Image.new("L", size, 0)
    paint(ImageDraw.Draw(img), size[0], size[1])
    return np.asarray(img, dtype=np.uint8)


def _object_paint(category: str):
    def paint(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        r, b = w - 1, h - 1
        if category == "circle":
            d.ellipse((0, 0, r, b), fill=_BODY)
        elif category == "square":
            d.rectangle((0, 0, r, b), fill=_BODY)
        elif category == "triangle":
            d.polygon([(r / 2, 0), (r, b), (0, b)], fill=_BODY)
        elif category == "diamond":
            d.polygon([(r / 2, 0), (r, b / 2), (r / 2, b), (0, b / 2)], fill=_BODY)
        else:
            raise ValueError(f"unknown object category {category!r}")

    return paint


def _person(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    head = max(2, round(0.34 * h))
    cx = (w - 1) / 2
    d.ellipse((cx - head / 2, 0, cx + head / 2 - 1, head - 1), fill=_SKIN)
    body_top, legs_top = head, round(0.72 * h)
    d.rectangle((round(0.15 * w), body_top, round(0.85 * w) - 1, legs_top - 1), fill=_BODY)
    leg = max(1, round(0.2 * w))
    d.rectangle((round(0.25 * w), legs_top, round(0.25 * w) + leg - 1, h - 1), fill=_DARK)
    d.rectangle((round(0.75 * w) - leg, legs_top, round(0.75 * w) - 1, h - 1), fill=_DARK)


def _robot(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    antenna = max(1, round(0.1 * h))
    head_bottom = antenna + max(2, round(0.28 * h))
    cx = w // 2
    d.rectangle((cx, 0, cx, antenna - 1), fill=_DARK)
    d.rectangle((round(0.2 * w), antenna, round(0.8 * w) - 1, head_bottom - 1), fill=_BODY)
    eye_y = antenna + (head_bottom - antenna) // 2
    d.point([(round(0.35 * w), eye_y), (round(0.65 * w) - 1, eye_y)], fill=_DARK)
    legs_top = round(0.8 * h)
    d.rectangle((0, head_bottom, w - 1, legs_top - 1), fill=_BODY)
    leg = max(1, round(0.25 * w))
    d.rectangle((round(0.15 * w), legs_top, round(0.15 * w) + leg - 1, h - 1), fill=_DARK)
    d.rectangle((round(0.85 * w) - leg, legs_top, round(0.85 * w) - 1, h - 1), fill=_DARK)


@lru_cache(maxsize=1024)
def _label_map(category: str, w: int, h: int) -> np.ndarray:
    """Per-pixel part labels of a subject drawn in a w x h box (cached: the world has few distinct boxes)."""
    paint = {"person": _person, "robot": _robot}.get(category) or _object_paint(category)
    out = _draw((w, h), paint)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=1024)
def _texture_marks(texture: str, w: int, h: int) -> np.ndarray:
    """Boolean w x h pattern of darker marks, relative to the subject box so it moves with the subject."""
    ys, xs = np.mgrid[0:h, 0:w]
    if texture == "plain":
        out = np.zeros((h, w), dtype=bool)
    elif texture == "striped":
        band = max(1, h // 6)
        out = (ys // band) % 2 == 1
    elif texture == "dotted":
        step = max(3, min(w, h) // 4)
        out = (ys % step == step // 2) & (xs % step == step // 2)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    out.setflags(write=False)
    return out


def _clip(bbox, size: int) -> tuple[int, int, int, int, int, int]:
    """Box clipped to the canvas plus the offset of the visible part inside the unclipped box."""
    x0, y0, x1, y1 = bbox
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty bbox {tuple(bbox)}: expected x0 < x1 and y0 < y1")
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    return cx0, cy0, cx1, cy1, cx0 - x0, cy0 - y0


def _placement_labels(scene: Scene, i: int) -> tuple[np.ndarray, tuple[slice, slice], np.ndarray]:
    p = scene.placements[i]
    x0, y0, x1, y1 = p.bbox
    labels = _label_map(p.subject.category, x1 - x0, y1 - y0)
    cx0, cy0, cx1, cy1, ox, oy = _clip(p.bbox, scene.size)
    window = (slice(cy0, cy1), slice(cx0, cx1))
    crop = (slice(oy, oy + cy1 - cy0), slice(ox, ox + cx1 - cx0))
    return labels[crop], window, _texture_marks(p.subject.texture, x1 - x0, y1 - y0)[crop]


def background(name: str, size: int) -> np.ndarray:
    if name not in SCENES:
        raise ValueError(f"unknown scene background {name!r}; expected one of {sorted(SCENES)}")
    sky, ground = SCENES[name]
    out = np.empty((size, size, 3), dtype=np.uint8)
    horizon = round(SKY_FRACTION * size)
    out[:horizon] = sky
    out[horizon:] = ground
    return out


def render_array(scene: Scene) -> np.ndarray:
    """The scene as an HxWx3 uint8 array; placements are drawn in order, later ones on top."""
    canvas = background(scene.background, scene.size)
    for i, p in enumerate(scene.placements):
        if p.subject.colour not in COLOURS:
            raise ValueError(f"unknown colour {p.subject.colour!r}; expected one of {sorted(COLOURS)}")
        labels, window, marks = _placement_labels(scene, i)
        body_rgb = COLOURS[p.subject.colour]
        region = canvas[window]
        body = labels == _BODY
        region[body] = body_rgb
        region[body & marks] = shade(body_rgb)
        region[labels == _SKIN] = SKIN
        region[labels == _DARK] = DARK
    return canvas


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image of side `scene.size`."""
    return Image.fromarray(render_array(scene), mode="RGB")


def own_mask(scene: Scene, i: int) -> np.ndarray:
    """All pixels placement i paints, ignoring occlusion."""
    out = np.zeros((scene.size, scene.size), dtype=bool)
    labels, window, _ = _placement_labels(scene, i)
    out[window] = labels != _EMPTY
    return out


def subject_mask(scene: Scene, i: int) -> np.ndarray:
    """Pixels of placement i still visible after every later placement has been drawn over it."""
    if not 0 <= i < len(scene.placements):
        raise IndexError(f"placement index {i} out of range for a scene with {len(scene.placements)} placements")
    mask = own_mask(scene, i)
    for j in range(i + 1, len(scene.placements)):
        mask &= ~own_mask(scene, j)
    return mask


def visible_fraction(scene: Scene, i: int) -> float:
    """Share of placement i's own pixels that stay visible (1.0 = not occluded at all)."""
    own = own_mask(scene, i).sum()
    return float(subject_mask(scene, i).sum() / own) if own else 0.0


def area_weights(src: int, dst: int) -> np.ndarray:
    """[dst, src] matrix: share of each source cell inside each destination cell (rows sum to 1). Area-averaging a
    pixel map onto a token grid is `area_weights(h, rows) @ map @ area_weights(w, cols).T`; the SRUM reward map
    (model.reward_map) and the diagnostics' token cover both do it this one way."""
    edges = np.linspace(0.0, src, dst + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def token_cover(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Share of each token's pixels that `mask` (H x W, bool) covers, on a (rows, cols) token grid (area average,
    as the pipeline's resize of the image onto the model's side maps pixels to tokens)."""
    m = np.asarray(mask, dtype=np.float32)
    rows, cols = grid
    h, w = m.shape
    if h % rows == 0 and w % cols == 0:
        return m.reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3))
    return (area_weights(h, rows) @ m @ area_weights(w, cols).T).astype(np.float32)


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes; deterministic for identical pixels (PIL writes no timestamp)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
