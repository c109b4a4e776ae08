"""From Scone-S2I rows to model batches.

A batch is a dict of tensors (padded to the largest reference count and text length in the batch):
    input_ids [B, T] long      [BOS] + instruction words, [PAD] after
    text_mask [B, T] bool      valid text tokens ([BOS] always valid)
    ref_pixels [B, R, 3, S, S] float in [-1, 1], zeros for missing references
    ref_mask [B, R] bool
    target_pixels [B, 3, S, S] (only when every example has a target)
    qa_pixels [B, 3, S, S], qa_ids [B, Tq], qa_mask [B, Tq], qa_answer [B] (-100: no question)
        (only when some example has a question; questions are about the target image)
"""
from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from model.latent import to_unit
from model.tokenizer import answer_id, encode_text


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
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what}: expected a uint8 H x W x 3 image, got shape {img.shape} dtype {img.dtype}")
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return img


def pad_token_ids(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def collate(examples: Sequence[Example], tokenizer, cfg) -> dict[str, torch.Tensor]:
    """Pad a list of examples into one batch. `cfg` is a model.config.ModelConfig or the model's SconeConfig
    (image_size, max_text_len, max_references are read). Text longer than max_text_len is truncated."""
    if not examples:
        raise ValueError("collate needs at least one example")
    size, max_refs = cfg.image_size, cfg.max_references
    b = len(examples)
    r = max(len(e.refs) for e in examples)
    if r > max_refs:
        raise ValueError(f"an example has {r} references; the model takes at most max_references={max_refs}")
    ref_pixels = torch.zeros(b, r, 3, size, size)
    ref_mask = torch.zeros(b, r, dtype=torch.bool)
    for i, e in enumerate(examples):
        for j, img in enumerate(e.refs):
            ref_pixels[i, j] = to_unit(square_image(img, size, f"example {i} reference {j}"))
            ref_mask[i, j] = True
    input_ids, text_mask = pad_token_ids([encode_text(tokenizer, e.instruction, cfg.max_text_len) for e in examples],
                                    tokenizer.pad_token_id)
    batch = {"input_ids": input_ids, "text_mask": text_mask, "ref_pixels": ref_pixels, "ref_mask": ref_mask}

    has_target = [e.target is not None for e in examples]
    if any(has_target) and not all(has_target):
        raise ValueError("some examples have a target and some do not; collate training and inference examples apart")
    if all(has_target):
        batch["target_pixels"] = torch.stack(
            [to_unit(square_image(e.target, size, f"example {i} target")) for i, e in enumerate(examples)]
        )
    if any(e.qa for e in examples):
        if not all(has_target):
            raise ValueError("questions are about the target image, but the examples have no target")
        questions = [encode_text(tokenizer, e.qa[0][0] if e.qa else "", cfg.max_text_len) for e in examples]
        batch["qa_ids"], batch["qa_mask"] = pad_token_ids(questions, tokenizer.pad_token_id)
        batch["qa_answer"] = torch.tensor([answer_id(tokenizer, e.qa[0][1]) if e.qa else -100 for e in examples])
        batch["qa_pixels"] = batch["target_pixels"]
    return batch
