"""A ViT that arrives able to see, as BAGEL's SigLIP does.

BAGEL-7B-MoT ships a SigLIP encoder pretrained on billions of image-text pairs; the tiny release would otherwise
start from a random one, and the understanding stage then has to teach the ViT and the language model at once
through the answers alone, which stays at chance on colour, shape and texture within the chain's budget
(BENCHMARKS.md, "Understanding pretraining"). So the chain pretrains the ViT first, the way a dense vision encoder
is pretrained when exact labels exist: every patch token predicts what covers it (the subject's colour, category
and texture, or background) and the pooled tokens predict the scene. The labels come from the subject world's
renderer (`data.render.subject_mask`), on scenes drawn like the understanding rows (`data.understanding`), from
the training combinations only and a stream of their own, so no held-out subject is seen.

Only the ViT's weights leave this module (`save_vit`; `model.bagel.release.read_pretrained_vit` reads them
for `model.bagel.bootstrap.assemble_release`); the heads
are scaffolding. A held-out set from another stream measures per-token accuracy, written beside the weights.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from model.bagel.config import SiglipConfig
from model.bagel.release import VIT_FILE
from model.bagel.siglip import SiglipVisionModel, grid_position_ids, patchify

VIT_METRICS = "vit_pretrain.json"
COVER = 0.25  # a token belongs to the subject covering the most of it, if at least this share; else background


@lru_cache(maxsize=1)
def _vocabularies() -> dict[str, tuple[str, ...]]:
    from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, SCENES, TEXTURES

    return {"colour": tuple(COLOURS), "category": (*OBJECT_CATEGORIES, *CHARACTER_CATEGORIES),
            "texture": tuple(TEXTURES), "scene": tuple(SCENES)}


TOKEN_ATTRIBUTES = ("colour", "category", "texture")


@dataclass
class LabelledImages:
    """pixels (N, 3, S, S) in [-1, 1]; per token labels (N, tokens) per attribute, 0 = background; scene (N,)."""

    pixels: torch.Tensor
    tokens: dict[str, torch.Tensor]
    scene: torch.Tensor

    def __len__(self) -> int:
        return len(self.pixels)


def token_labels(scene, grid: int) -> dict[str, np.ndarray]:
    """Per token of a grid x grid ViT grid: index + 1 of the covering subject's colour / category / texture."""
    from data.render import subject_mask, token_cover

    vocab = _vocabularies()
    covers = np.stack([token_cover(subject_mask(scene, i), (grid, grid)).reshape(-1)
                       for i in range(len(scene.placements))]) if scene.placements else np.zeros((1, grid * grid))
    owner = covers.argmax(axis=0)
    owned = covers.max(axis=0) >= COVER
    out = {}
    for attr in TOKEN_ATTRIBUTES:
        ids = np.array([vocab[attr].index(getattr(p.subject, attr)) + 1 for p in scene.placements] or [0])
        out[attr] = np.where(owned, ids[owner], 0)
    return out


def draw_images(data_cfg, stream: str, n: int, image_size: int, patch: int, split: str = "train") -> LabelledImages:
    """`n` scenes of the understanding rows' kind from the world stream `stream`, rendered, with their labels."""
    from data.render import render_array
    from data.understanding import draw_scene
    from data.world import dataset_world

    world = dataset_world(data_cfg, stream, split)
    grid = image_size // patch
    vocab = _vocabularies()
    pixels, labels, scenes = [], {a: [] for a in TOKEN_ATTRIBUTES}, []
    for _ in range(n):
        scene, _, _ = draw_scene(world)
        pixels.append(render_array(scene))
        for attr, ids in token_labels(scene, grid).items():
            labels[attr].append(ids)
        scenes.append(vocab["scene"].index(scene.background))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != image_size:
        raise ValueError(f"the world renders {x.shape[-1]} px images; the ViT pretraining expects {image_size}")
    return LabelledImages(x, {a: torch.from_numpy(np.stack(v)).long() for a, v in labels.items()},
                          torch.tensor(scenes))


class AttributeHeads(nn.Module):
    """Linear read-outs of the ViT's tokens (per token) and of their mean (the scene)."""

    def __init__(self, hidden: int):
        super().__init__()
        vocab = _vocabularies()
        self.token_heads = nn.ModuleDict({a: nn.Linear(hidden, len(vocab[a]) + 1) for a in TOKEN_ATTRIBUTES})
        self.scene_head = nn.Linear(hidden, len(vocab["scene"]))

    def forward(self, feats: torch.Tensor, n_images: int) -> dict[str, torch.Tensor]:
        per_image = feats.reshape(n_images, -1, feats.shape[-1])
        out = {a: head(per_image) for a, head in self.token_heads.items()}
        out["scene"] = self.scene_head(per_image.mean(dim=1))
        return out


def _encode(vit: SiglipVisionModel, pixels: torch.Tensor, patch: int) -> torch.Tensor:
    grid = pixels.shape[-1] // patch
    pos = grid_position_ids(grid, grid, grid).repeat(len(pixels))
    patches = torch.cat([patchify(im, patch) for im in pixels])
    return vit(patches, pos, [grid * grid] * len(pixels))


def _losses(out: dict, batch: LabelledImages) -> dict[str, torch.Tensor]:
    losses = {a: F.cross_entropy(out[a].flatten(0, 1), batch.tokens[a].flatten()) for a in TOKEN_ATTRIBUTES}
    losses["scene"] = F.cross_entropy(out["scene"], batch.scene)
    return losses


def _subset(images: LabelledImages, idx) -> LabelledImages:
    return LabelledImages(images.pixels[idx], {a: v[idx] for a, v in images.tokens.items()}, images.scene[idx])


@torch.no_grad()
def accuracy(vit: SiglipVisionModel, heads: AttributeHeads, images: LabelledImages, patch: int) -> dict[str, float]:
    """Per attribute: share of tokens right, and of subject tokens right (the background is most tokens)."""
    out = heads(_encode(vit, images.pixels, patch), len(images))
    result = {"scene": float((out["scene"].argmax(-1) == images.scene).float().mean())}
    for a in TOKEN_ATTRIBUTES:
        pred, truth = out[a].argmax(-1), images.tokens[a]
        result[f"{a}_tokens"] = float((pred == truth).float().mean())
        on = truth > 0
        result[f"{a}_subject_tokens"] = float((pred[on] == truth[on]).float().mean()) if on.any() else float("nan")
    return result


def pretrain_vit(vit: SiglipVisionModel, train: LabelledImages, heldout: LabelledImages | None, *, patch: int,
                 steps: int, batch_size: int, lr: float, seed: int, progress: bool = True) -> dict:
    """Train `vit` in place on `train` (AdamW, cosine to zero after 5 % warm-up); return losses and accuracies."""
    torch.manual_seed(seed)
    heads = AttributeHeads(vit.config.hidden_size)
    params = [*vit.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    order = random.Random(seed)
    idx: list[int] = []
    curve = []
    vit.train()
    bar = tqdm(range(steps), desc="vit_pretrain", disable=not progress, mininterval=2.0)
    for step in bar:
        if len(idx) < batch_size:
            fresh = list(range(len(train)))
            order.shuffle(fresh)
            idx += fresh
        batch, idx = _subset(train, idx[:batch_size]), idx[batch_size:]
        losses = _losses(heads(_encode(vit, batch.pixels, patch), len(batch)), batch)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            curve.append({"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    vit.eval()
    metrics = {"steps": steps, "train_images": len(train), "final_loss": curve[-1]["loss"], "curve": curve}
    if heldout is not None:
        metrics["heldout"] = accuracy(vit, heads, heldout, patch)
    return metrics


def save_vit(vit: SiglipVisionModel, out_dir: str | Path, metrics: dict) -> Path:
    """`vit.safetensors` (the release's `vit_model.*` names) and the pretraining's metrics beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({f"vit_model.{k}": v.detach().contiguous() for k, v in vit.state_dict().items()}, str(out_dir / VIT_FILE))
    (out_dir / VIT_METRICS).write_text(json.dumps({"config": vit.config.model_dump(), **metrics}, indent=1))
    return out_dir


def fresh_vit(cfg: SiglipConfig, seed: int) -> SiglipVisionModel:
    """The preset's ViT with PyTorch's default initialisation (what `BagelModel.init_fresh` leaves it), under `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SiglipVisionModel(cfg)
