"""The release directory the chain starts from, made in the chain (a GPU user downloads theirs instead).

Four steps, each its own DVC stage so one changing does not redo the others: the tokenizer (a byte-level BPE on
the subject world's text, in the Qwen2 file layout), the autoencoder (the FLUX architecture at the preset's size,
trained on the training datasets' images), the ViT (the preset's SigLIP, pretrained on the subject world's exact
per-token labels, as BAGEL's arrives pretrained) and the release itself (a fresh language model of the preset and
the three above, written as a BAGEL release directory). Each writes in staging and swaps in on success.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from prefect import task

from tasks.atomic import publish, staged
from data.catalog import HELDOUT_BENCHES
from tasks.paths import DATASETS, Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params


def _check_bootstrapped(params: Params) -> None:
    if params.model.release:
        raise ValueError(f"model.release is set ({params.model.release}): the chain starts from that release "
                         "directory and makes none; unset it (null) to bootstrap the tiny release")


def tokenizer_step(params: Params) -> dict:
    from model.bagel.bootstrap import subject_world_texts, train_tokenizer

    _check_bootstrapped(params)
    paths = Paths.from_params(params)
    # every parquet dataset the chain builds (the benchmark's and SRUM's prompts are read from their own files;
    # the MICo-Bench and MIGE-Bench cases are held-out benchmark folders, not parquet: byte-level BPE spells their
    # few prompts from the same subject-world words anyway)
    texts = subject_world_texts(paths.data, [d for d in DATASETS
                                             if d not in ("sconeeval_bench", "srum_prompts", *HELDOUT_BENCHES)])
    out = paths.bootstrap / "tokenizer"
    with staged(paths.root, "tokenizer") as tmp:
        train_tokenizer(texts, tmp / "tokenizer", params.model.bootstrap.tokenizer_vocab_size)
        publish([(tmp / "tokenizer", out)])
    summary = {"texts": len(texts), "vocab_size": params.model.bootstrap.tokenizer_vocab_size, "dir": str(out)}
    print(f"tokenizer: byte-level BPE of {summary['vocab_size']} tokens from {len(texts)} texts -> {out}")
    return summary


def autoencoder_step(params: Params) -> dict:
    from model.bagel.autoencoder_train import images_from_datasets, save_autoencoder, train_autoencoder
    from model.bagel.config import preset

    _check_bootstrapped(params)
    paths = Paths.from_params(params)
    cfg = params.model.bootstrap.autoencoder
    images = images_from_datasets(paths.data, cfg.datasets, size=params.model.image_size)
    out = paths.bootstrap / "autoencoder"
    ae, metrics = train_autoencoder(images, preset(params.model.preset).vae, steps=cfg.steps,
                                    batch_size=cfg.batch_size, lr=cfg.lr, seed=params.model.bootstrap.seed,
                                    kl_weight=cfg.kl_weight, progress=True)
    with staged(paths.root, "autoencoder") as tmp:
        save_autoencoder(ae, ae.config, tmp / "autoencoder", metrics)
        publish([(tmp / "autoencoder", out)])
    print(f"autoencoder: {len(images)} images, held-out PSNR {metrics.get('psnr_holdout')} dB -> {out}")
    return {"images": len(images), "dir": str(out), **{k: v for k, v in metrics.items() if not isinstance(v, list)}}


def release_step(params: Params) -> dict:
    from model.bagel.bootstrap import assemble_release
    from model.bagel.release import read_pretrained_vit

    _check_bootstrapped(params)
    paths = Paths.from_params(params)
    out = paths.release(params)
    with staged(paths.root, "release") as tmp:
        assemble_release(paths.bootstrap / "tokenizer", paths.bootstrap / "autoencoder", tmp / out.name,
                         preset_name=params.model.preset, seed=params.model.bootstrap.seed,
                         vit_state=read_pretrained_vit(paths.bootstrap / "vit"))
        publish([(tmp / out.name, out)])
    files = sorted(p.name for p in out.iterdir())
    print(f"release: {params.model.preset} preset -> {out} ({', '.join(files)})")
    return {"dir": str(out), "files": files, "config": json.loads((out / "llm_config.json").read_text())}


tokenizer_task = task(tokenizer_step, name="bootstrap_tokenizer")
autoencoder_task = task(autoencoder_step, name="bootstrap_autoencoder")
release_task = task(release_step, name="bootstrap_release")
