"""Generation contexts: where a sample's reference images and its instruction enter the packed sequence.

The one layout function of the family: training (`family.packed_forward`), sampling (`generate._context`, hence
the KV-cached passes, the uncached check and `BagelPipeline.bridge_relevance`) and `BagelModel.generation_context`
all build their contexts with `add_generation_context`, from the instruction as `encode_instruction` cuts it.

Two layouts, told apart by the instruction alone:

- plain (no `<imagehere>`: Scone's rows, MICo's rows and the released checkpoints' convention): every reference in
  order, each as its clean VAE tokens then its ViT tokens (each image framed by `<|vision_start|>` ...
  `<|vision_end|>`), then the instruction framed as `<|im_start|> text <|im_end|>`.
- interleaved (MIGE's multimodal instructions, "add <imagehere> on the left of <imagehere>"): the instruction's
  text pieces in order, the k-th reference's VAE and ViT tokens standing where the k-th placeholder stands. Each
  text piece is framed as its own text segment, as BAGEL frames every text input of an interleaved context; an
  empty piece is left out, except the last one, so the context always closes with a text segment (the
  understanding bridge reads the context's end there, model.bagel.bridge.layout_of). "add <imagehere> on the left
  of <imagehere>" with subject S and source X: [add] [S vae][S vit] [on the left of] [X vae][X vit] [] .

Guidance passes without the instruction use the plain layout with an empty framed text: (I, -) keeps the references
(in order) and (-, -) has none, as training's guidance dropout removes them (`drop_text`). Either way, the noisy
target the caller adds after the context is the last segment, so it sees the whole context and no context token
sees it: text segments are causal, images attend fully within themselves, every segment sees every earlier one
(model.bagel.packing), and the context's keys and values stay exactly cacheable across denoising steps.

The number of placeholders must equal the number of references (`model.batching.instruction_pieces` raises
otherwise, naming the row or case).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from model.bagel.packing import PackedSample
from model.batching import instruction_pieces


def encode_instruction(encode: Callable[[str], Sequence[int]], instruction: str, n_references: int,
                       what: str) -> list[list[int]]:
    """Token ids of the instruction's pieces: one piece (plain) or n_references + 1 (interleaved)."""
    return [list(encode(piece)) if piece else [] for piece in instruction_pieces(instruction, n_references, what)]


def is_interleaved(pieces: Sequence[Sequence[int]]) -> bool:
    return len(pieces) > 1


def add_generation_context(sample: PackedSample, frame_text: Callable[[Sequence[int]], list[int]],
                           n_references: int, add_reference: Callable[[int], None],
                           pieces: Sequence[Sequence[int]], *, drop_text: bool = False) -> None:
    """Append a generation context to `sample` (see the module docstring).

    add_reference(k) appends reference k's image segments (clean VAE tokens, then ViT tokens); n_references of
    them. pieces: `encode_instruction`'s output (one piece: plain; n_references + 1: interleaved). drop_text: the
    instruction is replaced by an empty framed text and the references come first (the (I, -) pass; with
    n_references 0 the (-, -) pass)."""
    if drop_text or not is_interleaved(pieces):
        for k in range(n_references):
            add_reference(k)
        sample.add_text(frame_text([] if drop_text else (pieces[0] if pieces else [])))
        return
    if len(pieces) != n_references + 1:
        raise ValueError(f"an interleaved instruction of {len(pieces) - 1} placeholder(s) for {n_references} "
                         "reference(s): each placeholder stands for one reference (model.batching.instruction_pieces)")
    last = len(pieces) - 1
    for k, piece in enumerate(pieces):
        if piece or k == last:
            sample.add_text(frame_text(piece))
        if k < n_references:
            add_reference(k)


def context_text_tokens(pieces: Sequence[Sequence[int]]) -> int:
    """Text tokens (framing included) `add_generation_context` adds for `pieces` with the instruction kept."""
    if not is_interleaved(pieces):
        return len(pieces[0]) + 2 if pieces else 2
    last = len(pieces) - 1
    return sum(len(p) + 2 for k, p in enumerate(pieces) if p or k == last)
