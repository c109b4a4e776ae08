"""From Scone-S2I rows to examples, and images between uint8 arrays and the model's [-1, 1] tensors.

An `Example` is what every consumer hands the model: decoded references, the instruction, and for training the
target (the row's last image) and at most one question-answer pair about it. Batching them into the packed
sequence is the model family's (model.bagel.family.collate).
"""
from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


@dataclass
class Example:
    refs: list[np.ndarray]  # uint8 H x W x 3 each
    instruction: str
    target: np.ndarray | None = None
    qa: list[tuple[str, str]] = field(default_factory=list)


def decode_image(data: bytes | dict) -> np.ndarray:
    """Encoded image (bytes, or the {"bytes": ...} struct of Hugging Face image columns) -> uint8 H x W x 3."""
    if isinstance(data, dict):
        data = data.get("bytes")
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"expected encoded image bytes, got {type(data).__name__}")
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _qa_pairs(raw) -> list[tuple[str, str]]:
    if raw is None:
        return []
    pairs = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"qa entries must be [question, answer] pairs, got {pair!r}")
        out.append((str(pair[0]), str(pair[1])))
    return out


def examples_from_rows(rows: Iterable[dict], *, rng: np.random.Generator | None = None) -> list[Example]:
    """Rows with `image` (encoded images, the last one is the target), `instruction` and optional `qa`.

    One question per example: drawn with `rng` when given, else a fixed pick derived from the instruction text
    (deterministic, yet different questions for different rows)."""
    examples = []
    for i, row in enumerate(rows):
        images = row.get("image")
        if not images:
            raise ValueError(f"row {i} has no images; the `image` column needs references and a target (last)")
        decoded = [decode_image(b) for b in images]
        pairs = _qa_pairs(row.get("qa"))
        if pairs:
            pick = int(rng.integers(len(pairs))) if rng is not None else zlib.crc32(row["instruction"].encode()) % len(pairs)
            pairs = [pairs[pick]]
        examples.append(Example(refs=decoded[:-1], instruction=row["instruction"], target=decoded[-1], qa=pairs))
    return examples


def square_image(img: np.ndarray, size: int, what: str) -> np.ndarray:
    """`img` (uint8 H x W x 3) resized to size x size (bicubic) unless it already is; `what` names it in errors."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what}: expected a uint8 H x W x 3 image, got shape {img.shape} dtype {img.dtype}")
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return img


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 numpy [..., H, W, 3] (clipped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()
