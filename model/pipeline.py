"""A checkpoint ready to use: load it once, then generate images and answer yes/no questions about images.

Every consumer (the evaluation runner, the `self` judge, SRUM's candidate sampling and its reward judge, the
MLflow pyfunc model, the benchmarks) goes through `load_pipeline(checkpoint_dir)` instead of loading a model
class itself, so what a checkpoint is (a BAGEL release directory: downloaded, bootstrapped by the chain, or saved
by a stage or a SRUM round) is decided here, once, from its files.

- `generate(examples, *, steps, cfg_text, cfg_image, seed, bridge, batch_size)`: one uint8 image per example;
- `yes_probability(images, questions)`: P(yes) from the understanding expert, one per (image, question);
- `answer(images, questions)`: the understanding expert's greedy answer (text), one per (image, question);
- `bridge_relevance(references, instruction)`: the understanding bridge's relevance s per reference ViT token
  (read-only, for diagnostics);
- `latent_grid`: (rows, cols) of latent tokens of a generated image, the grid SRUM's reward maps live on;
- `image_size`: the side of the images it generates; `max_references`: how many references it takes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RELEASE_MARKERS = ("llm_config.json", "vit_config.json")


def is_release_dir(path: str | Path) -> bool:
    """A BAGEL release directory (released, bootstrapped by the chain, or saved by a stage)."""
    return all((Path(path) / name).exists() for name in RELEASE_MARKERS)


def pipeline_settings(model_cfg) -> dict:
    """What a pipeline needs besides the weights, from params' `model:` section (a ModelConfig), as plain JSON:
    saved with a registered model so it generates exactly as the chain evaluated it."""
    return {"image_size": model_cfg.image_size, "max_references": model_cfg.max_references,
            "timestep_shift": model_cfg.timestep_shift, "bridge": model_cfg.bridge.model_dump()}


@dataclass
class BagelPipeline:
    model: Any  # model.bagel.model.BagelModel
    tokenizer: Any  # model.bagel.family.BagelTokenizer
    bridge_cfg: Any = None  # model.config.BridgeConfig used when generate(bridge=True)
    timestep_shift: float = 1.0
    max_references: int = 4
    requested_size: int | None = None  # generated side asked for (rounded up to the model's token grid)

    @property
    def image_size(self) -> int:
        from model.bagel.family import image_side

        return image_side(self.model.config, self.requested_size or self.model.config.vit.image_size)

    @property
    def latent_grid(self) -> tuple[int, int]:
        side = self.image_size
        return self.model.latent_grid(side, side)

    def generate(self, examples: Sequence, *, steps: int, cfg_text: float, cfg_image: float, seed: int,
                 bridge: bool = False, batch_size: int = 32) -> list[np.ndarray]:
        from model.bagel.generate import generate

        if bridge and self.bridge_cfg is None:
            raise ValueError("generate(bridge=True) needs the pipeline's bridge settings (load_pipeline(..., "
                             "bridge_cfg=params.model.bridge))")
        return generate(self.model, self.tokenizer, examples, steps=steps, cfg_text=cfg_text, cfg_image=cfg_image,
                        seed=seed, bridge=self.bridge_cfg if bridge else None, batch_size=batch_size,
                        timestep_shift=self.timestep_shift, image_size=self.image_size)

    def yes_probability(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> np.ndarray:
        from model.bagel.generate import yes_probability

        return yes_probability(self.model, self.tokenizer, images, questions, image_size=self.image_size)

    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int = 8) -> list[str]:
        from model.bagel.understand import greedy_answers

        return greedy_answers(self.model, self.tokenizer, images, questions, max_new_tokens=max_new_tokens,
                              image_size=self.image_size)

    def bridge_relevance(self, references: Sequence[np.ndarray], instruction: str) -> list[np.ndarray] | None:
        """Read-only: the understanding bridge's relevance s (model.bagel.bridge, Eq. 1-3: mean cosine of each
        reference ViT token's state after `bridge_cfg.early_layer` with the instruction's) in the generation context
        `generate` builds (references resized to `image_size`, their VAE then ViT tokens, the framed instruction).
        One float32 (rows, cols) array per reference over its ViT grid; None without references or instruction
        words. One forward; nothing is masked, changed or sampled (diagnostics: evaluation.diagnostics)."""
        import torch

        from model.bagel.generate import _context, _prepare
        from model.batching import Example

        if self.bridge_cfg is None:
            raise ValueError("bridge_relevance needs the pipeline's bridge settings (load_pipeline(..., "
                             "pipeline_settings(params.model)))")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():  # the (I, T) pass's context, exactly as the sampler encodes it
                case = _prepare(model, self.tokenizer, Example(refs=list(references), instruction=instruction), 0,
                                self.image_size)
                sample = _context(model, case, "full")
                s = model.bridge_relevance(sample, self.bridge_cfg)
        finally:
            model.train(was_training)
        if s is None:
            return None
        return [si.float().reshape(im.rows, im.cols).cpu().numpy() for si, im in zip(s, sample.vit_images)]


def load_pipeline(checkpoint_dir: str | Path, settings: dict | None = None, *, device: str = "cpu"):
    """The checkpoint at `checkpoint_dir` as a pipeline (weights in fp32 on `device`, eval mode); `settings` as
    `pipeline_settings` makes them (defaults: the model's own image size, 4 references, no bridge settings)."""
    settings = dict(settings or {})
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {directory} does not exist; run the stage that makes it first")
    if not is_release_dir(directory):
        raise ValueError(f"checkpoint {directory} is not a BAGEL release directory (it has no "
                         f"{' / '.join(RELEASE_MARKERS)}); checkpoints of the retired scratch model cannot be "
                         "loaded any more: retrain the stage that made it")
    import torch

    from model.bagel.family import BagelTokenizer
    from model.bagel.release import load_release
    from model.config import BridgeConfig

    release = load_release(directory, device=device, dtype=torch.float32)
    model = release.model.eval()
    bridge = BridgeConfig(**settings["bridge"]) if settings.get("bridge") else None
    return BagelPipeline(model, BagelTokenizer(directory), bridge, float(settings.get("timestep_shift", 1.0)),
                         int(settings.get("max_references", 4)), settings.get("image_size"))
