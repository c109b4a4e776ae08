"""From Scone-S2I rows to examples, and images between uint8 arrays and the model's [-1, 1] tensors.

An `Example` is what every consumer hands the model: decoded references, the instruction, and for training the
target (the row's last image) and at most one question-answer pair about it. An understanding row (task type
"understanding", data.understanding) is an understanding-only example instead: its image as `target`, every
question-answer pair about it, and no generation sample. Batching them into the packed sequence is the model
family's (model.bagel.family.collate).
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

from data.instructions import IMAGE_PLACEHOLDER
from data.records import UNDERSTANDING_TASK_TYPES


@dataclass
class Example:
    refs: list[np.ndarray]  # uint8 H x W x 3 each
    instruction: str
    target: np.ndarray | None = None
    qa: list[tuple[str, str]] = field(default_factory=list)
    understanding_only: bool = False  # an understanding row: questions about `target`, nothing to generate


def instruction_pieces(instruction: str, n_images: int, what: str) -> list[str]:
    """The text of `instruction` around its `<imagehere>` placeholders (MIGE's multimodal instructions: the k-th
    placeholder stands for the k-th input image), each piece stripped: n_images + 1 pieces. An instruction without
    placeholders is one piece (the references then come before it, model.bagel.context). Any other count of
    placeholders than n_images is a ValueError naming `what` (the row or case)."""
    n = instruction.count(IMAGE_PLACEHOLDER)
    if n == 0:
        return [instruction]
    if n != n_images:
        raise ValueError(f"{what}: its instruction has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} input "
                         f"image(s); each placeholder stands for one input image, in order: {instruction!r}")
    return [piece.strip() for piece in instruction.split(IMAGE_PLACEHOLDER)]


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
    """Rows with `image` (encoded images, the last one is the target), `instruction` and optional `qa` and
    `task_type`.

    One question per example: drawn with `rng` when given, else a fixed pick derived from the instruction text
    (deterministic, yet different questions for different rows). An understanding row keeps all its questions and
    becomes an understanding-only example of its one image."""
    examples = []
    for i, row in enumerate(rows):
        images = row.get("image")
        if not images:
            raise ValueError(f"row {i} has no images; the `image` column needs references and a target (last)")
        decoded = [decode_image(b) for b in images]
        pairs = _qa_pairs(row.get("qa"))
        if row.get("task_type") in UNDERSTANDING_TASK_TYPES:
            if len(decoded) != 1 or not pairs:
                raise ValueError(f"row {row.get('key', i)}: an understanding row needs one image and questions, got "
                                 f"{len(decoded)} images and {len(pairs)} questions")
            examples.append(Example(refs=[], instruction=row["instruction"], target=decoded[0], qa=pairs,
                                    understanding_only=True))
            continue
        if pairs:
            pick = int(rng.integers(len(pairs))) if rng is not None else zlib.crc32(row["instruction"].encode()) % len(pairs)
            pairs = [pairs[pick]]
        instruction_pieces(row["instruction"], len(decoded) - 1, f"row {row.get('key', i)}")  # placeholders vs inputs
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
