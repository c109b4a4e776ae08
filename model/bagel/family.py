"""The BAGEL / Scone family on the project's stage trainer: `train_stage(..., model_family="model.bagel.family:BAGEL")`.

From a release directory to a release directory:

- `load(path)`: a release directory (strictly, model.bagel.release) -> `BagelForTraining`, an nn.Module around
  `BagelModel` (its parameters are `bagel.<release key>`) with what model/train.py calls: `training_loss`,
  `expert_parameters`, `save_pretrained`, and `config` (the release's BagelConfig: the architecture is the
  release's, params' `model:` only says how to feed and bridge it).
- `save_pretrained(out_dir, state_dict=...)` writes a release directory (llm/vit configs, [ae_params.json], the
  tokenizer files copied from the source release, `ema.safetensors` (or the source's weights name) and
  `ae.safetensors`), in the dtype the source release stored its weights in, plus the `config.json` marker below.
  `weights_writer(out_dir, max_shard_bytes)` is the same written tensor by tensor (model/train.py streams the
  gathered weights into it; shards + index above max_shard_bytes). `load_zero3(path, ds_config)`: `load` for
  ZeRO-3, straight into each rank's partitions (deepspeed.zero.Init).
- `tokenizer(path)`: the release's Qwen2 tokenizer (with BAGEL's four markers) as a `BagelTokenizer`, which also
  carries the release's BagelConfig so `collate` knows the patch sizes. `path=None` (training from scratch) is not
  supported: there is no Qwen2 vocabulary to build one from.
- `build(model_cfg, tokenizer)`: fresh weights of the `tiny` preset (model.bagel.config.preset), the vocabulary
  widened to the tokenizer's when needed. `model_cfg` (params' `model:`, a model.config.ModelConfig) holds no
  architecture: that is the release's (or the preset's); `collate` reads its data-side fields image_size,
  max_references, timestep_shift, timestep_sampling, cfg_drop_text and cfg_drop_image.

Batches (`collate`): every image (references and targets, uint8 H x W x 3 decoded from the rows' PNGs) is resized
(bicubic) to one square side S = the smallest multiple of lcm(ViT patch, latent patch * AE downsample) that is at
least `model_cfg.image_size` (the project's 32x32 images stay 32x32 with the tiny preset, ViT patch 8 and latent
tokens of 4 pixels; BAGEL-7B, 14 and 16 pixels, takes them at 112x112), normalised as BAGEL's transforms
((pixel / 255 - 0.5) / 0.5) and stacked in `pixels`. The layout of each sample is plain Python (ids and image
indices), so no randomness happens in collate: `training_loss` encodes the latents with the frozen autoencoder,
draws t (per sample) and the noise from the `generator` train.py passes, builds the packed sequences and runs them
all in ONE packed forward (`BagelModel.hidden_states`):

- generation sample: for each reference, its clean VAE tokens (timestep 0) then its ViT tokens, each framed by
  <|vision_start|> ... <|vision_end|>; the instruction as <|im_start|> text <|im_end|>; then the target latent
  tokens at x_t = (1 - t) x0 + t eps. fm_loss = MSE of llm2vae(h) against v = eps - x0 over all target tokens.
  An instruction with `<imagehere>` placeholders (MIGE's rows) is interleaved instead: its framed text pieces with
  each reference's VAE and ViT tokens at its placeholder (model.bagel.context, the layout sampling builds too;
  collate's sample then also carries "pieces", the pieces' ids). An editing row's source image is one of its
  references, so the model sees the image it edits.
- understanding sample (an example with a `qa` pair; one pair per example, model.batching's pick): the target's
  ViT tokens, the question framed, then the answer framed as <|im_start|> answer <|im_end|>; und_loss = LM
  cross-entropy of the answer tokens and the closing <|im_end|> (each predicted from the token before it, the first
  from <|im_start|>, as `BagelModel.answer_logits` queries), mean over those tokens of the batch; 0 when none.
  An understanding-only example (an understanding row, `Example.understanding_only`) gives one understanding sample
  per question about its image and no generation sample; a batch of them only has fm_loss 0.
- guidance dropout (train mode only, drawn from the generator by model.scheduler.guidance_dropout): with
  probability cfg_drop_image the references (VAE and ViT tokens) and the instruction are removed (the sampler's
  (-, -) pass), else with cfg_drop_text the instruction becomes an empty framed text (its (I, -) pass). t, the noise, x_t and the velocity target come from model.scheduler.

Experts (`expert_parameters`): understanding = the language model's understanding copies, embed_tokens, the final
norm, lm_head, and the ViT connector; generation = every `*_moe_gen` copy, vae2llm, llm2vae, time_embedder. The ViT,
the autoencoder and the two sin-cos tables belong to neither and stay frozen (as in BAGEL / Scone training), but for
the ViT in a stage with `train_vit` (`expert_parameters("vit")`: BAGEL's pretraining trains its ViT; the tiny
release's is fresh, so the understanding pretraining stage trains it).

Understanding bridge (Scone Stage II, model.bagel.bridge): `training_loss(batch, bridge=True,
bridge_config=<params' model.bridge>)`, computed in the same packed forward (s from the understanding states after
layer early_layer, -inf on masked reference tokens for the target's latent queries in the following layers up to
apply_until). The BridgeConfig comes per call, from the stage trainer's ModelConfig (model/train.py's StageLoss
passes `model_cfg.bridge` to families whose training_loss takes `bridge_config`): a release's config has no
bridge settings, and params stay their source. `bridge_straight_through=True` trains the mask through its soft
surrogate (forward unchanged). bridge=True without a bridge_config is refused with an error.

What model/train.py assumes that a release directory does not have: train.py requires `config.json` in the init
checkpoint (`train_stage` raises FileNotFoundError otherwise) and in out_dir (`finished_summary`: without it a
finished stage would not be recognised and would train again). Release directories have no such file, so
`save_pretrained` writes a small marker `config.json` (the family and the layout; `load` does not need it) and
`mark_release(directory)` adds one to a downloaded release before it is used as an init checkpoint. The clean fix
in train.py: let the family say what a checkpoint is (e.g. `ModelFamily.is_checkpoint(path)`, default
`(path / "config.json").exists()`), used by the init check and by `finished_summary`.

Over 400 lines on purpose: the family's training-side contract (loss, packed forward, IO, collate) is what
model/train.py's recipes call through one seam; splitting it would split that seam.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn

from model.bagel.bridge import BridgeHook
from model.bagel.config import BagelConfig, preset
from model.bagel.context import add_generation_context, context_text_tokens, encode_instruction, is_interleaved
from model.bagel.model import AE_PREFIX, BagelModel
from model.bagel.packing import PackedSample
from model.bagel.qwen2_mot import GEN_SUFFIX
from model.bagel.release import FAMILY_SPEC, MARKER, ClosedOnExit, mark_release  # noqa: F401  (family API)
from model.bagel.release import (TOKENIZER_FILES, WEIGHT_NAMES, ReleaseWriter, _shapes, find_weights,
                                 load_release, load_release_partitioned, load_tokenizer)
from model.config import BridgeConfig
from model.scheduler import (add_noise, flow_matching_loss, guidance_dropout, sample_timesteps, training_noise,
                             velocity_target)
from model.train import EXPERTS, VIT, ModelFamily

PREFIX = "bagel."  # the wrapper's parameter names: PREFIX + the release's key

_UNDERSTANDING = ("language_model.", "connector.")
_GENERATION = ("vae2llm.", "llm2vae.", "time_embedder.")
_FROZEN = ("vit_model.", AE_PREFIX, "vit_pos_embed.", "latent_pos_embed.")


def expert_of(name: str) -> str | None:
    """The expert a BagelModel parameter belongs to, or None for the frozen parts (ViT, autoencoder, tables)."""
    if name.startswith(_FROZEN):
        return None
    if name.startswith(_GENERATION):
        return "generation"
    if name.startswith(_UNDERSTANDING):
        return "generation" if GEN_SUFFIX in name else "understanding"
    raise ValueError(f"parameter {name!r} belongs to no known part of the BAGEL model")


def _stored_dtype(directory: Path) -> torch.dtype:
    """dtype of the first floating tensor of a release's weights (what save_pretrained writes back)."""
    files = find_weights(directory).files
    with safe_open(str(files[0]), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_slice(key)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(tensor.get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


class BagelTokenizer:
    """A release's Qwen2 tokenizer, its four markers' ids, and the release's BagelConfig (sizes for collate)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.hf, self.special = load_tokenizer(self.directory)
        self.config = BagelConfig.from_release(self.directory, _shapes(find_weights(self.directory).files))

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def save_pretrained(self, directory: str | Path) -> None:
        """The release's tokenizer files, copied unchanged (a re-save by transformers would rewrite them)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src, dst = self.directory / name, directory / name
            if src.exists() and not (dst.exists() and dst.samefile(src)):
                shutil.copy2(src, dst)


def tokenizer(path: Path | None) -> BagelTokenizer:
    if path is None:
        raise ValueError("the BAGEL family takes its Qwen2 tokenizer from a release directory: pass the release "
                         "as init_checkpoint (model.bagel.family.mark_release adds the config.json train.py wants); "
                         "training from scratch without one is not supported")
    return BagelTokenizer(path)


# ---------------------------------------------------------------------------------------------------------------
# the trainable model


class BagelForTraining(nn.Module):
    """BagelModel plus the stage trainer's contract."""

    def __init__(self, bagel: BagelModel, tokenizer_dir: Path | None, weights_name: str = "ema.safetensors",
                 save_dtype: torch.dtype = torch.float32):
        super().__init__()
        if weights_name not in WEIGHT_NAMES:
            raise ValueError(f"weights_name must be one of {WEIGHT_NAMES}")
        self.bagel = bagel
        self.config = bagel.config
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.weights_name = weights_name
        self.save_dtype = save_dtype

    # ---- experts ----

    def expert_parameters(self, expert: str) -> list[nn.Parameter]:
        if expert == VIT:  # not an expert: the ViT encoder, which only a stage with train_vit trains
            return [p for n, p in self.bagel.named_parameters() if n.startswith("vit_model.")]
        if expert not in EXPERTS:
            raise ValueError(f"unknown expert {expert!r}; expected one of {EXPERTS}")
        return [p for n, p in self.bagel.named_parameters() if expert_of(n) == expert]

    # ---- loss ----

    def _timesteps(self, n: int, batch: dict, generator, device) -> torch.Tensor:
        return sample_timesteps(n, shift=float(batch.get("timestep_shift", self.config.timestep_shift)),
                                mode=batch.get("timestep_sampling", "logit_normal"), generator=generator,
                                device=device)

    def packed_forward(self, batch: dict, generator: torch.Generator | None = None,
                       bridge: BridgeConfig | None = None, straight_through: bool = False) -> dict:
        """One packed forward over a collated batch: predicted and target velocities of every generation
        sample's target tokens, answer logits and labels of every understanding sample, and what was drawn
        (t, x_t per generation sample; which conditions were dropped).

        bridge: Scone's semantic mask in every generation sample that kept its references and instruction
        (`bridge_kept`: the share of reference tokens it kept, a tensor, or None without a mask). straight_through:
        the loss's gradient also reaches s through the soft surrogate (values unchanged)."""
        m = self.bagel
        cfg = m.config
        device, dtype = m.vae2llm.weight.device, m.vae2llm.weight.dtype
        pixels = batch["pixels"].to(device, dtype)
        gens, qas = batch["samples"], batch["qa"]
        rows, cols = m.latent_grid(pixels.shape[2], pixels.shape[3])

        # guidance dropout, drawn first so the noise does not depend on it; eval mode drops nothing
        drop_image, drop_text = [False] * len(gens), [False] * len(gens)
        if self.training:
            drop_image, drop_text = guidance_dropout(len(gens), float(batch.get("cfg_drop_image", 0.0)),
                                                     float(batch.get("cfg_drop_text", 0.0)), generator)

        # clean latents of the references kept and of every target, in one call of the frozen encoder (on the first
        # image when there is none to encode: every module runs once per forward, see _hidden_states)
        need = sorted({i for s, di in zip(gens, drop_image) for i in ([] if di else s["refs"])}
                      | {s["target"] for s in gens})
        with torch.no_grad():
            encoded = m.ae_encode(pixels[need or [0]])
        latents = {i: m.latent_to_tokens(z) for i, z in zip(need, encoded)}

        t = self._timesteps(len(gens), batch, generator, device) if gens else None
        samples, targets, velocity_targets, x_ts = [], [], [], []
        for k, s in enumerate(gens):
            sample = PackedSample()
            refs = [] if drop_image[k] else s["refs"]

            def add_reference(j, sample=sample, refs=refs):
                m.add_latent(sample, latents[refs[j]], rows, cols, timestep=0.0)
                sample.add_vit_image(pixels[refs[j]], cfg.vit.patch_size, cfg.vit_max_num_patch_per_side, m.special)

            # model.bagel.context: references first then the text, or interleaved at the instruction's placeholders
            add_generation_context(sample, m.frame_text, len(refs), add_reference, s.get("pieces") or [s["text"]],
                                   drop_text=drop_text[k])
            x0 = latents[s["target"]]
            eps = training_noise(x0.shape, generator, device, dtype)
            x_t = add_noise(x0, eps, t[k:k + 1])
            m.add_latent(sample, x_t, rows, cols, timestep=float(t[k]))
            samples.append(sample)
            targets.append(sample.vae_images[-1].index)
            velocity_targets.append(velocity_target(x0, eps))
            x_ts.append(x_t)

        answers, labels = [], []
        for q in qas:
            sample = m.understanding_context([pixels[q["image"]]], q["question"])
            framed = m.frame_text(q["answer"])
            seg = sample.add_text(framed)
            answers.append(torch.arange(seg.start, seg.end - 1))  # <|im_start|> a_1 .. a_n predict a_1 .. <|im_end|>
            labels.extend(framed[1:])
            samples.append(sample)

        latent_keepalive = None
        if not gens:
            # an understanding-only batch: one zero latent token in a sample of its own, weight 0 in the loss, so the
            # generation expert, vae2llm, the timestep embedder, the latent table and llm2vae run as in any batch
            # (every module once per forward on every rank, see _hidden_states)
            latent_keepalive = PackedSample()
            m.add_latent(latent_keepalive, torch.zeros(1, m.vae2llm.in_features, device=device, dtype=dtype), 1, 1,
                         timestep=0.0)
            samples.append(latent_keepalive)

        hook = None
        if bridge is not None:
            # only generation samples: an understanding sample's last text is its answer, not an instruction
            hook = BridgeHook.from_config(bridge, samples, m.special, cfg.llm.num_hidden_layers,
                                          straight_through=straight_through,
                                          only=[True] * len(gens) + [False] * (len(samples) - len(gens)))
        hidden, keepalive = self._hidden_states(samples, hook)
        out = {"t": t, "x_t": x_ts, "drop_image": drop_image, "drop_text": drop_text, "velocity": None,
               "velocity_target": None, "logits": None, "labels": None,
               "bridge_kept": hook.kept_fraction() if hook is not None else None}
        if gens:
            h = torch.cat([hidden[k][idx.to(device)] for k, idx in enumerate(targets)])
            out["velocity"] = m.llm2vae(h)
            out["velocity_target"] = torch.cat(velocity_targets)
        else:  # the one-token latent sample's velocity, weight 0
            index = latent_keepalive.vae_images[0].index.to(device)
            keepalive = keepalive + 0.0 * m.llm2vae(hidden[-1][index]).float().sum()
        if qas:
            h = torch.cat([hidden[len(gens) + j][idx.to(device)] for j, idx in enumerate(answers)])
            out["logits"] = m.language_model.lm_head(h)
            out["labels"] = torch.tensor(labels, device=device)
        else:  # lm_head still runs (on one token, weight 0): see _hidden_states
            keepalive = keepalive + 0.0 * m.language_model.lm_head(hidden[0][:1]).float().sum()
        out["keepalive"] = keepalive
        return out

    def _hidden_states(self, samples: list[PackedSample],
                       bridge: BridgeHook | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`BagelModel.hidden_states` (no cache) with every module called exactly once per forward, whatever the
        batch holds: under ZeRO-3 each module call gathers its weights collectively, so the ranks must call the
        same modules in the same order (a per-sample embedding, or a ViT skipped on one rank only, deadlocks them).
        A module with nothing to do runs on a dummy input whose output enters the loss with weight 0
        (`keepalive`), so every trainable weight also gets a gradient on every rank. The bridge calls no module
        (tensor arithmetic on the states and masks only), so it leaves that order as it is."""
        m = self.bagel
        cfg = m.config
        device, dtype = m.vae2llm.weight.device, m.vae2llm.weight.dtype
        lens = [len(s) for s in samples]
        offsets = [sum(lens[:i]) for i in range(len(samples))]
        x = torch.zeros(sum(lens), cfg.llm.hidden_size, dtype=dtype, device=device)
        keepalive = torch.zeros((), device=device)

        ids = torch.tensor([i for s in samples for i in s.text_ids], dtype=torch.long, device=device)
        where = torch.tensor([o + i for o, s in zip(offsets, samples) for i in s.text_index], dtype=torch.long,
                             device=device)
        x[where] = m.language_model.model.embed_tokens(ids)

        vit = [(o, im) for o, s in zip(offsets, samples) for im in s.vit_images]
        if vit:
            pos = torch.cat([im.position_ids for _, im in vit]).to(device)
            feats = m.vit_model(torch.cat([im.patches for _, im in vit]).to(device, dtype), pos,
                                [im.patches.shape[0] for _, im in vit])
            x[torch.cat([o + im.index for o, im in vit]).to(device)] = m.connector(feats) + m.vit_pos_embed(pos)
        else:
            p = cfg.vit.patch_size
            pos = torch.zeros(1, dtype=torch.long, device=device)
            dummy = m.connector(m.vit_model(torch.zeros(1, p * p * 3, dtype=dtype, device=device), pos, [1]))
            keepalive = keepalive + 0.0 * (dummy + m.vit_pos_embed(pos)).float().sum()

        vae = [(o, im) for o, s in zip(offsets, samples) for im in s.vae_images]
        if not vae:
            raise ValueError("a BAGEL training batch needs at least one latent image (every generation sample has "
                             "one; packed_forward gives an understanding-only batch a one-token latent sample)")
        pos = torch.cat([im.position_ids for _, im in vae]).to(device)
        t = torch.cat([torch.full((im.tokens.shape[0],), im.timestep) for _, im in vae]).to(device)
        tokens = torch.cat([im.tokens for _, im in vae]).to(device, dtype)
        x[torch.cat([o + im.index for o, im in vae]).to(device)] = (
            m.vae2llm(tokens) + m.time_embedder(t) + m.latent_pos_embed(pos))

        gen_mask = torch.cat([s.gen_mask() for s in samples]).to(device)
        positions = torch.tensor([q for s in samples for q in s.position_ids], device=device)
        masks = [s.attention_mask(device) for s in samples]
        h, _ = m.language_model(x, gen_mask, positions, masks, lens, bridge=bridge)
        return list(h.split(lens)), keepalive

    def training_loss(self, batch: dict, *, bridge: bool = False, und_loss_weight: float = 0.1,
                      bridge_straight_through: bool = False, bridge_config: BridgeConfig | None = None,
                      generator: torch.Generator | None = None, **_unused) -> dict[str, torch.Tensor]:
        """fm_loss (velocity MSE on the target tokens) + und_loss_weight * und_loss (answer cross-entropy).

        bridge: Scone's semantic mask, with the settings of `bridge_config` (the stage trainer passes the params'
        model.bridge); bridge_straight_through (with bridge): gradient through its soft surrogate."""
        if bridge and bridge_config is None:
            raise ValueError("bridge=True needs bridge_config (the params' model.bridge, which model/train.py "
                             "passes): a BAGEL release's config holds no bridge settings")
        out = self.packed_forward(batch, generator, bridge=bridge_config if bridge else None,
                                  straight_through=bridge and bridge_straight_through)
        device = self.bagel.vae2llm.weight.device
        fm_loss = und_loss = torch.zeros((), device=device)  # float32 whatever the weights' dtype
        if out["velocity"] is not None:
            fm_loss = flow_matching_loss(out["velocity"], out["velocity_target"])
        if out["logits"] is not None:
            und_loss = F.cross_entropy(out["logits"].float(), out["labels"])
        loss = fm_loss + und_loss_weight * und_loss + out["keepalive"]
        return {"loss": loss, "fm_loss": fm_loss, "und_loss": und_loss}

    def forward(self, batch: dict, bridge: bool = False, und_loss_weight: float = 0.1, generator=None, **kw):
        return self.training_loss(batch, bridge=bridge, und_loss_weight=und_loss_weight, generator=generator, **kw)

    # ---- IO ----

    def bagel_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The release's keys (the wrapper's prefix removed)."""
        state = state_dict if state_dict is not None else self.state_dict()
        if any(not k.startswith(PREFIX) for k in state):
            raise ValueError(f"state dict keys must start with {PREFIX!r} (a BagelForTraining state dict)")
        return {k[len(PREFIX):]: v for k, v in state.items()}

    def save_pretrained(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        max_shard_bytes: int | None = None) -> Path:
        """Write a release directory (see the module docstring) from `state_dict` (full weights under this
        wrapper's names) or from this model's own weights."""
        state = state_dict if state_dict is not None else self.state_dict()
        with self.weights_writer(out_dir, max_shard_bytes) as writer:
            for key, tensor in state.items():
                writer.add(key, tensor)
        return Path(out_dir)

    def weights_writer(self, out_dir: str | Path, max_shard_bytes: int | None = None) -> "TrainingReleaseWriter":
        """A release directory written as weights arrive (model/final_weights.py gathers ZeRO-3 weights group by group
        and hands each tensor over): see `TrainingReleaseWriter`."""
        writer = ReleaseWriter(Path(out_dir), self.config, self.bagel.special, weights_name=self.weights_name,
                               max_shard_bytes=max_shard_bytes, tokenizer_from=self.tokenizer_dir)
        return TrainingReleaseWriter(writer, self.save_dtype)


class TrainingReleaseWriter(ClosedOnExit):
    """`ReleaseWriter` under BagelForTraining's parameter names (PREFIX + release key). Floating tensors are cast
    to the release's stored dtype on a host copy made at once, so the caller may free or reuse what it passed
    (ZeRO-3 re-partitions a gathered weight as soon as its group is done); `close` also adds the marker."""

    def __init__(self, writer: ReleaseWriter, dtype: torch.dtype):
        self.writer = writer
        self.dtype = dtype

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if not key.startswith(PREFIX):
            raise ValueError(f"{key!r}: keys must start with {PREFIX!r} (a BagelForTraining state dict)")
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        self.writer.add(key[len(PREFIX):], tensor.detach().to("cpu", dtype, copy=True))

    def close(self) -> Path:
        out = self.writer.close()
        mark_release(out)
        return out

    def abort(self) -> None:
        self.writer.abort()


def load(path: Path) -> BagelForTraining:
    path = Path(path)
    release = load_release(path, device="cpu", dtype=torch.float32)
    return BagelForTraining(release.model, path, release.weights.name, _stored_dtype(path))


def load_zero3(path: Path, ds_config: dict) -> BagelForTraining:
    """`load` for a ZeRO-3 engine with `ds_config`: the weights go straight into each rank's partitions
    (model.bagel.release.load_release_partitioned), the full model never materialises on any rank."""
    path = Path(path)
    release = load_release_partitioned(path, ds_config)
    return BagelForTraining(release.model, path, release.weights.name, _stored_dtype(path))


def build(model_cfg, tok: BagelTokenizer) -> BagelForTraining:
    """Fresh weights of the `tiny` preset (see the module docstring for what of model_cfg is used)."""
    cfg = preset("tiny")
    if len(tok) > cfg.llm.vocab_size or max(vars(tok.special).values()) >= cfg.llm.vocab_size:
        cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"vocab_size": len(tok)})})
    bagel = BagelModel(cfg, tok.special)
    bagel.init_fresh()
    return BagelForTraining(bagel, tok.directory)


# ---------------------------------------------------------------------------------------------------------------
# data


def examples_from_rows(rows: list[dict]) -> list:
    """Scone-S2I rows -> model.batching.Example (decoded references, target last, one qa pair at most)."""
    from model.batching import examples_from_rows as scone_examples

    return scone_examples(rows)


def image_side(cfg: BagelConfig, image_size: int) -> int:
    """Square side every image is resized to: a multiple of the ViT patch and of the latent token size."""
    step = math.lcm(cfg.vit.patch_size, cfg.latent_downsample)
    side = step * max(1, math.ceil(image_size / step))
    limit = min(cfg.vit.patch_size * cfg.vit_max_num_patch_per_side, cfg.latent_downsample * cfg.max_latent_size)
    if side > limit:
        raise ValueError(f"images of {side}x{side} exceed the model's position grids ({limit} pixels per side)")
    return side


def _pixels(img: np.ndarray, side: int) -> torch.Tensor:
    img = np.asarray(img, dtype=np.uint8)
    if img.shape[:2] != (side, side):
        img = np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
    return (torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def _instruction(example, tok: BagelTokenizer, model_cfg) -> list[list[int]]:
    """The example's instruction cut at its placeholders (model.bagel.context.encode_instruction); an interleaved
    instruction needs every input it names, so max_references may not cut its references."""
    pieces = encode_instruction(tok.encode, example.instruction, len(example.refs),
                                f"example with instruction {example.instruction!r}")
    if is_interleaved(pieces) and len(example.refs) > model_cfg.max_references:
        raise ValueError(f"instruction {example.instruction!r} places {len(example.refs)} input images, more than "
                         f"model.max_references={model_cfg.max_references} keeps: raise model.max_references")
    return pieces


def collate(examples: list, tok: BagelTokenizer, model_cfg) -> dict:
    """Examples -> {"pixels": (n, 3, S, S), "samples": [{"refs", "target", "text"}], "qa": [{"image", "question",
    "answer"}], + the timestep and guidance-dropout settings}; see the module docstring."""
    side = image_side(tok.config, model_cfg.image_size)
    images, samples, qas = [], [], []
    for e in examples:
        if e.target is None:
            raise ValueError("BAGEL training needs a target image (the last image of each row)")
        if getattr(e, "understanding_only", False):  # its image and every question about it, nothing to generate
            images.append(_pixels(e.target, side))
            qas += [{"image": len(images) - 1, "question": tok.encode(q), "answer": tok.encode(a)} for q, a in e.qa]
            continue
        pieces = _instruction(e, tok, model_cfg)
        refs = list(range(len(images), len(images) + min(len(e.refs), model_cfg.max_references)))
        images += [_pixels(r, side) for r in e.refs[: len(refs)]]
        target = len(images)
        images.append(_pixels(e.target, side))
        if is_interleaved(pieces):  # "text": the words alone; the layout is the pieces'
            samples.append({"refs": refs, "target": target, "text": [i for p in pieces for i in p], "pieces": pieces})
        else:
            samples.append({"refs": refs, "target": target, "text": pieces[0]})
        for question, answer in e.qa[:1]:
            qas.append({"image": target, "question": tok.encode(question), "answer": tok.encode(answer)})
    return {
        "pixels": torch.stack(images),
        "samples": samples,
        "qa": qas,
        "timestep_shift": float(model_cfg.timestep_shift),
        "timestep_sampling": model_cfg.timestep_sampling,
        "cfg_drop_text": float(model_cfg.cfg_drop_text),
        "cfg_drop_image": float(model_cfg.cfg_drop_image),
    }


def sample_tokens(example, tok: BagelTokenizer, model_cfg) -> int:
    """Tokens `example` takes in the packed sequence `collate` + `packed_forward` build, guidance dropout aside
    (it only removes tokens, so this is the most a sample takes): per reference (up to max_references) its
    latent tokens and its ViT tokens, each between two markers; the framed instruction (each framed piece of an
    interleaved one, model.bagel.context); the target's latent
    tokens between two markers; and with a question, the understanding sample (the target's framed ViT tokens,
    the framed question, the framed answer)."""
    cfg = tok.config
    side = image_side(cfg, model_cfg.image_size)
    vit = (side // cfg.vit.patch_size) ** 2 + 2
    latent = (side // cfg.latent_downsample) ** 2 + 2
    if getattr(example, "understanding_only", False):  # an understanding sample per question, nothing else
        return sum(vit + len(tok.encode(q)) + 2 + len(tok.encode(a)) + 2 for q, a in example.qa)
    refs = min(len(example.refs), model_cfg.max_references)
    n = refs * (latent + vit) + context_text_tokens(_instruction(example, tok, model_cfg)) + latent
    for question, answer in example.qa[:1]:
        n += vit + len(tok.encode(question)) + 2 + len(tok.encode(answer)) + 2
    return n


BAGEL = ModelFamily(build=build, load=load, tokenizer=tokenizer, examples_from_rows=examples_from_rows,
                    collate=collate, sample_tokens=sample_tokens, load_zero3=load_zero3)
