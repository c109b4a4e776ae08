"""The bootstrap's ViT step (tasks.bootstrap has the other three): the preset's SigLIP pretrained on the subject
world's exact per-token labels (model.bagel.vit_pretrain). A module of its own so that its code is a dependency of
its DVC stage alone: editing the ViT pretraining does not retrain the tokenizer or the autoencoder."""
from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task

from tasks.atomic import publish, staged
from tasks.bootstrap import _check_bootstrapped
from tasks.paths import Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params


def vit_step(params: Params) -> dict:
    from model.bagel.config import preset
    from model.bagel.vit_pretrain import draw_images, fresh_vit, pretrain_vit, save_vit

    _check_bootstrapped(params)
    paths = Paths.from_params(params)
    cfg, vit_cfg = params.model.bootstrap.vit, preset(params.model.preset).vit
    out = paths.bootstrap / "vit"
    vit = fresh_vit(vit_cfg, params.model.bootstrap.seed)
    metrics: dict = {"steps": 0}
    if cfg.steps:
        size, patch = vit_cfg.image_size, vit_cfg.patch_size
        train = draw_images(params.data, "vit_pretrain", cfg.images, size, patch)
        heldout = draw_images(params.data, "vit_heldout", cfg.heldout_images, size, patch, split="heldout")
        metrics = pretrain_vit(vit, train, heldout, patch=patch, steps=cfg.steps, batch_size=cfg.batch_size,
                               lr=cfg.lr, seed=params.model.bootstrap.seed)
    with staged(paths.root, "vit") as tmp:
        save_vit(vit, tmp / "vit", metrics)
        publish([(tmp / "vit", out)])
    held = metrics.get("heldout", {})
    print(f"vit: {cfg.steps} steps; held-out subject tokens colour {held.get('colour_subject_tokens', float('nan')):.2f}"
          f" / category {held.get('category_subject_tokens', float('nan')):.2f} / texture "
          f"{held.get('texture_subject_tokens', float('nan')):.2f}, scene {held.get('scene', float('nan')):.2f} -> {out}")
    return {"dir": str(out), "steps": cfg.steps, **held}


vit_task = task(vit_step, name="bootstrap_vit")
