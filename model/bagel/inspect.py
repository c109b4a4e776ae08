"""`scone model inspect`: parameter counts per expert and a ZeRO-3 memory plan, from a preset built on the
meta device (no memory, no weights), so a laptop can size a BAGEL-7B run.

Counting conventions:
- The understanding expert is every language-model weight without `_moe_gen` (including the embedding table
  and the LM head); the generation expert is the `_moe_gen` copies plus `vae2llm`, `llm2vae`, the time embedder
  and the latent position table. The ViT, connector and the AE are counted apart.
- Active per token: the language-model weights one token goes through. A text token uses the understanding
  expert, the embedding table and the LM head: exactly a Qwen2.5-7B (7.6B, the "7B active" of BAGEL-7B-MoT);
  a latent token uses the generation expert and the small latent in/out layers (6.6B).
- ZeRO-3 shards every parameter, gradient and optimizer state over the GPUs: bf16 weights (2 B), and for
  trainable weights bf16 gradients (2 B), fp32 master weights (4 B) and Adam's two fp32 moments (8 B).
  Activations, buffers and fragmentation are not included. Frozen by default: the ViT and the AE (as in Scone's
  stages).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.bagel.config import preset
from model.bagel.model import BagelModel

GIB = 1024 ** 3


@dataclass
class Counts:
    understanding_layers: int
    generation_layers: int
    embeddings: int  # embed_tokens + lm_head
    generation_io: int  # vae2llm, llm2vae, time embedder, latent pos table
    vit: int  # ViT + connector + vit pos table
    autoencoder: int

    @property
    def language_model(self) -> int:
        return self.understanding_layers + self.generation_layers + self.embeddings

    @property
    def unified(self) -> int:
        """The weights file of the release (everything but the AE)."""
        return self.language_model + self.generation_io + self.vit

    @property
    def total(self) -> int:
        return self.unified + self.autoencoder

    @property
    def active_text_token(self) -> int:
        return self.understanding_layers + self.embeddings

    @property
    def active_latent_token(self) -> int:
        return self.generation_layers + self.generation_io

    @property
    def active_per_token(self) -> int:
        return max(self.active_text_token, self.active_latent_token)


def count(model: BagelModel) -> Counts:
    parts = dict(understanding_layers=0, generation_layers=0, embeddings=0, generation_io=0, vit=0, autoencoder=0)
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("ae."):
            parts["autoencoder"] += n
        elif name.startswith(("vit_model.", "connector.", "vit_pos_embed.")):
            parts["vit"] += n
        elif name.startswith(("vae2llm.", "llm2vae.", "time_embedder.", "latent_pos_embed.")):
            parts["generation_io"] += n
        elif name.startswith(("language_model.model.embed_tokens.", "language_model.lm_head.")):
            parts["embeddings"] += n
        elif "_moe_gen" in name:
            parts["generation_layers"] += n
        else:
            parts["understanding_layers"] += n
    return Counts(**parts)


def memory_plan(counts: Counts, gpus: int, frozen: tuple[str, ...] = ("vit", "autoencoder")) -> dict[str, float]:
    """GiB per GPU under ZeRO-3."""
    frozen_params = sum(getattr(counts, f) for f in frozen)
    trainable = counts.total - frozen_params
    plan = {
        "bf16 weights": 2 * counts.total,
        "bf16 gradients": 2 * trainable,
        "fp32 master weights": 4 * trainable,
        "fp32 Adam moments": 8 * trainable,
    }
    per_gpu = {k: v / gpus / GIB for k, v in plan.items()}
    per_gpu["total"] = sum(per_gpu.values())
    return per_gpu


def inspect_preset(name: str, gpus: int = 8) -> dict:
    with torch.device("meta"):
        model = BagelModel(preset(name))
    counts = count(model)
    return {"preset": name, "gpus": gpus, "counts": counts, "memory_gib_per_gpu": memory_plan(counts, gpus)}


def _b(n: int) -> str:
    return f"{n / 1e9:8.3f} B" if n >= 1e8 else f"{n / 1e6:8.3f} M"


def run(name: str, gpus: int = 8) -> int:
    report = inspect_preset(name, gpus)
    c: Counts = report["counts"]
    rows = [
        ("understanding expert (decoder layers + norm)", c.understanding_layers),
        ("generation expert (decoder layers + norm)", c.generation_layers),
        ("token embedding + LM head", c.embeddings),
        ("latent in/out, time embedder, latent pos", c.generation_io),
        ("ViT + connector + ViT pos", c.vit),
        ("FLUX autoencoder", c.autoencoder),
        ("language model (MoT, both experts)", c.language_model),
        ("total (with ViT and AE)", c.total),
        ("active per text token (und. expert + embedding + head)", c.active_text_token),
        ("active per latent token (gen. expert + latent in/out)", c.active_latent_token),
    ]
    print(f"preset {name}")
    for label, n in rows:
        print(f"  {label:<56} {_b(n)}")
    print(f"ZeRO-3 over {gpus} GPU(s), GiB per GPU (ViT and AE frozen; activations not included):")
    for label, gib in report["memory_gib_per_gpu"].items():
        print(f"  {label:<56} {gib:8.2f}")
    return 0
