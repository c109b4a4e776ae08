"""The model's own judgement (the `self` judge): yes/no questions about images through the understanding expert."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.batching import pad_token_ids, square_image
from model.latent import to_unit
from model.tokenizer import encode_text


@torch.no_grad()
def yes_probability(
    model, tokenizer, images: Sequence[np.ndarray], questions: Sequence[str], *, batch_size: int = 64
) -> np.ndarray:
    """P(yes) = softmax over the {yes, no} logits of the LM head's answer, one per (image, question) pair."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions; pass one question per image")
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    if tokenizer.unk_token_id in (yes, no):
        raise ValueError("the tokenizer has no 'yes'/'no' tokens; build it with model.tokenizer.build_tokenizer")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        size, max_len = model.config.image_size, model.config.max_text_len
        out = []
        for s in range(0, len(images), batch_size):
            imgs, qs = images[s : s + batch_size], questions[s : s + batch_size]
            pixels = torch.stack([to_unit(square_image(im, size, f"image {s + i}")) for i, im in enumerate(imgs)])
            ids, mask = pad_token_ids([encode_text(tokenizer, q, max_len) for q in qs], tokenizer.pad_token_id)
            logits = model.answer_logits(pixels.to(device), ids.to(device), mask.to(device))
            out.append(torch.softmax(logits[:, [yes, no]].float(), dim=-1)[:, 0].cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
    finally:
        model.train(was_training)
