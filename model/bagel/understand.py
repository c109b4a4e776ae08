"""Open answers from the understanding expert: greedy decoding of the answer to a question about an image.

The query is the one training teaches (family.packed_forward's understanding sample, `BagelModel.answer_logits`):
the image's ViT tokens, the framed question, then `<|im_start|>`; each step appends the most likely token and
stops at `<|im_end|>` (or after `max_new_tokens`). The yes / no probability the self judge reads is
model.bagel.generate.yes_probability; this is its open-vocabulary sibling (one-word answers, captions).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.bagel.family import BagelTokenizer, _pixels, image_side
from model.bagel.model import BagelModel


@torch.no_grad()
def greedy_answers(model: BagelModel, tokenizer: BagelTokenizer, images: Sequence[np.ndarray],
                   questions: Sequence[str], *, max_new_tokens: int = 8, batch_size: int = 64,
                   image_size: int | None = None) -> list[str]:
    """The decoded greedy answer to each (image, question) pair, special tokens left out.

    Each image is resized to `family.image_side(model.config, image_size or its largest side)` as training does.
    Every step re-runs the whole (short) sequences in one packed forward; a finished answer leaves the batch."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions; pass one question per image")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be at least 1, got {batch_size}, {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        device = model.vae2llm.weight.device
        answers: list[list[int]] = [[] for _ in questions]
        for start in range(0, len(images), batch_size):
            pixels = []
            for i in range(start, min(start + batch_size, len(images))):
                img = np.asarray(images[i])
                if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                    raise ValueError(f"image {i}: expected a uint8 H x W x 3 image, got shape {img.shape} "
                                     f"dtype {img.dtype}")
                side = image_side(model.config, image_size or max(img.shape[:2]))
                pixels.append((i, _pixels(img, side).to(device)))
            open_ = [i for i, _ in pixels]
            pixel_of = dict(pixels)
            for _ in range(max_new_tokens):
                samples = []
                for i in open_:
                    sample = model.understanding_context([pixel_of[i]], tokenizer.encode(questions[i]))
                    sample.add_text([model.special.bos, *answers[i]])
                    samples.append(sample)
                hidden = model.hidden_states(samples)[0]
                logits = model.language_model.lm_head(torch.stack([h[-1] for h in hidden]))
                still = []
                for i, token in zip(open_, logits.argmax(dim=-1).tolist()):
                    if token != model.special.eos:
                        answers[i].append(int(token))
                        still.append(i)
                open_ = still
                if not open_:
                    break
        return [tokenizer.hf.decode(ids, skip_special_tokens=True).strip() for ids in answers]
    finally:
        model.train(was_training)
