"""Packed sequences for the unified model: which token is what, its rotary position, and who may attend to whom.

A sample is a list of segments in order. Each segment sees every earlier segment and itself: causally for text,
fully for an image (an image's VAE tokens or ViT tokens framed by `<|vision_start|>` / `<|vision_end|>`). The
noisy target is simply the last segment, so it sees the whole context and no context token sees it. A text token
takes one rotary position; an image takes a single position for all its tokens (markers included).

A sample may continue a cached prefix (`prefix_len` tokens, `first_position`): its mask then has the prefix's
columns in front, all visible, which is exactly what the same segments would see in one uncached sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.bagel.siglip import grid_position_ids, patchify

TEXT, VIT, VAE = 0, 1, 2


@dataclass(frozen=True)
class SpecialTokens:
    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    start_of_image: int  # <|vision_start|>
    end_of_image: int  # <|vision_end|>

    @classmethod
    def last_of_vocab(cls, vocab_size: int) -> "SpecialTokens":
        """Where BAGEL's loader puts them when a vocabulary lacks all four: appended, in this order."""
        return cls(vocab_size - 4, vocab_size - 3, vocab_size - 2, vocab_size - 1)


@dataclass
class Segment:
    start: int
    end: int
    causal: bool


@dataclass
class VaeImage:
    tokens: torch.Tensor  # (rows * cols, p * p * z) latent patches
    rows: int
    cols: int
    timestep: float
    index: torch.Tensor  # positions of its latent tokens in the sample
    position_ids: torch.Tensor  # ids into latent_pos_embed


@dataclass
class VitImage:
    patches: torch.Tensor  # (rows * cols, p * p * 3)
    index: torch.Tensor
    position_ids: torch.Tensor  # ids into the ViT's learned table and vit_pos_embed
    rows: int  # patch grid, which the understanding bridge needs to resize relevance onto the latent grid
    cols: int


@dataclass
class PackedSample:
    """One sample's layout. Built with the `add_*` methods; the model embeds and runs it."""

    prefix_len: int = 0
    first_position: int = 0
    kinds: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    text_index: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    vit_images: list[VitImage] = field(default_factory=list)
    vae_images: list[VaeImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def next_position(self) -> int:
        return self.position_ids[-1] + 1 if self.position_ids else self.first_position

    def _push_text(self, ids, positions) -> None:
        for tid, pos in zip(ids, positions):
            self.text_index.append(len(self.kinds))
            self.text_ids.append(int(tid))
            self.kinds.append(TEXT)
            self.position_ids.append(pos)

    def add_text(self, ids) -> Segment:
        """A text segment (already framed if it should be), causal, one position per token."""
        ids = [int(i) for i in ids]
        start, pos = len(self), self.next_position
        self._push_text(ids, range(pos, pos + len(ids)))
        return self._close(start, causal=True)

    def _add_image(self, kind: int, n_tokens: int, special: SpecialTokens) -> tuple[torch.Tensor, Segment]:
        start, pos = len(self), self.next_position
        self._push_text([special.start_of_image], [pos])
        body = torch.arange(len(self), len(self) + n_tokens)
        self.kinds.extend([kind] * n_tokens)
        self.position_ids.extend([pos] * n_tokens)
        self._push_text([special.end_of_image], [pos])
        return body, self._close(start, causal=False)

    def add_vit_image(self, image: torch.Tensor, patch: int, max_per_side: int,
                      special: SpecialTokens) -> Segment:
        """image: (3, H, W) normalised to [-1, 1], H and W multiples of `patch`."""
        rows, cols = image.shape[1] // patch, image.shape[2] // patch
        patches = patchify(image, patch)
        index, seg = self._add_image(VIT, patches.shape[0], special)
        self.vit_images.append(VitImage(patches, index, grid_position_ids(rows, cols, max_per_side), rows, cols))
        return seg

    def add_vae_image(self, tokens: torch.Tensor, rows: int, cols: int, timestep: float, max_latent_size: int,
                      special: SpecialTokens) -> Segment:
        """Latent patch tokens (clean reference at timestep 0, or the noisy target at t)."""
        if tokens.shape[0] != rows * cols:
            raise ValueError(f"{tokens.shape[0]} latent tokens for a {rows}x{cols} grid")
        index, seg = self._add_image(VAE, rows * cols, special)
        self.vae_images.append(VaeImage(tokens, rows, cols, float(timestep), index,
                                        grid_position_ids(rows, cols, max_latent_size)))
        return seg

    def _close(self, start: int, causal: bool) -> Segment:
        seg = Segment(start, len(self), causal)
        self.segments.append(seg)
        return seg

    def continuation(self) -> "PackedSample":
        """An empty sample that continues this one as its cached prefix."""
        return PackedSample(prefix_len=self.prefix_len + len(self), first_position=self.next_position)

    def gen_mask(self) -> torch.Tensor:
        """True for tokens of the generation expert (VAE latents); text, markers and ViT tokens are understanding."""
        return torch.tensor(self.kinds, dtype=torch.long) == VAE

    def attention_mask(self, device=None) -> torch.Tensor:
        """Bool (len, prefix_len + len): True where a query token may attend to a key token."""
        n = len(self)
        mask = torch.zeros(n, self.prefix_len + n, dtype=torch.bool, device=device)
        mask[:, : self.prefix_len] = True
        for seg in self.segments:
            s, e = seg.start, seg.end
            cols = slice(0, self.prefix_len + e)
            mask[s:e, cols] = True
            if seg.causal:
                block = torch.ones(e - s, e - s, dtype=torch.bool, device=device).tril()
                mask[s:e, self.prefix_len + s: self.prefix_len + e] = block
        return mask
