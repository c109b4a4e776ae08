"""Architecture of the BAGEL / Scone model family, parsed from a release directory or taken from a preset.

The release ships the language model's and the ViT's Hugging Face configs (`llm_config.json`, `vit_config.json`)
and, at most, the autoencoder's hyperparameters (`ae_params.json`; the real release has none and uses FLUX's).
The BAGEL-level settings have no file in the release: the grid sizes are read off the weights (the sin-cos tables
have max_side**2 rows), the rest are BAGEL's defaults.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
AE_PARAMS = "ae_params.json"


class _Released(BaseModel):
    """Config parsed from a released JSON file; keys we do not use are kept, so writing back loses nothing."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    @classmethod
    def from_json(cls, path: Path):
        return cls.model_validate(json.loads(Path(path).read_text()))

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")


class Qwen2Config(_Released):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    # BAGEL's loader forces these two whatever the file says; kept as fields so a config written back states them.
    qk_norm: bool = True
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads not divisible by "
                             f"{self.num_key_value_heads} key/value heads")
        if self.hidden_act != "silu":
            raise ValueError(f"only SwiGLU (hidden_act silu) is implemented, got {self.hidden_act}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class SiglipConfig(_Released):
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def used_layers(self) -> int:
        # The release's ViT weights stop one layer short of the config (BAGEL drops the last SigLIP layer).
        return self.num_hidden_layers - 1

    @property
    def positions_per_side(self) -> int:
        return self.image_size // self.patch_size


class AutoencoderConfig(_Released):
    """FLUX autoencoder; the defaults are FLUX's, used when the release has no `ae_params.json`."""

    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    downsample: int | None = None

    @model_validator(mode="after")
    def _downsample_matches(self):
        implied = 2 ** (len(self.ch_mult) - 1)
        if self.downsample is not None and self.downsample != implied:
            raise ValueError(f"downsample {self.downsample} disagrees with ch_mult {self.ch_mult} (x{implied})")
        return self

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class BagelConfig(BaseModel):
    """The whole unified model: language model, ViT, autoencoder and the settings that join them."""

    model_config = ConfigDict(extra="forbid")

    llm: Qwen2Config
    vit: SiglipConfig
    vae: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: the AE's downsampling times the latent patch."""
        return self.vae.factor * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size ** 2 * self.vae.z_channels

    @classmethod
    def from_release(cls, directory: Path, weight_shapes: dict[str, tuple[int, ...]] | None = None,
                     **overrides) -> "BagelConfig":
        """Configs from a release directory; grid sizes from the weights' sin-cos tables when shapes are given."""
        directory = Path(directory)
        ae_path = directory / AE_PARAMS
        fields = dict(
            llm=Qwen2Config.from_json(directory / LLM_CONFIG),
            vit=SiglipConfig.from_json(directory / VIT_CONFIG),
            vae=AutoencoderConfig.from_json(ae_path) if ae_path.exists() else AutoencoderConfig(),
        )
        if weight_shapes:
            if "vae2llm.weight" in weight_shapes:
                # BAGEL keeps the latent patch in its training args, not in a config file; the shape implies it
                z = fields["vae"].z_channels
                fields["latent_patch_size"] = _side_of_table(weight_shapes["vae2llm.weight"][1] // z,
                                                             "vae2llm.weight / z_channels")
            for key, name in (("latent_pos_embed.pos_embed", "max_latent_size"),
                              ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side")):
                if key in weight_shapes:
                    fields[name] = _side_of_table(weight_shapes[key][0], key)
        fields.update(overrides)
        return cls(**fields)

    def write_release_configs(self, directory: Path, write_ae_params: bool = True) -> None:
        directory = Path(directory)
        self.llm.to_json(directory / LLM_CONFIG)
        self.vit.to_json(directory / VIT_CONFIG)
        if write_ae_params:
            self.vae.to_json(directory / AE_PARAMS)


def _side_of_table(rows: int, key: str) -> int:
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"{key} has {rows} rows, not a square grid")
    return side


def preset(name: str) -> BagelConfig:
    """Named architectures: `tiny` runs on a laptop CPU; `bagel-7b` is BAGEL-7B-MoT (Qwen2.5-7B + SigLIP so400m)."""
    if name == "tiny":
        # The embedded default: the subject world's 32 x 32 images at their own size. ViT patch 8 (4 x 4 ViT
        # tokens per image), a FLUX autoencoder with one downsampling and latent patch 2 (16 x 16 x 4 latent, 8 x 8
        # latent tokens of 16 values, each carrying 4 x 4 pixels as BAGEL-7B's carries 16 x 16). Two downsamplings
        # (8 x 8 x 4) lose the subjects: the oracle judge scores the autoencoder's own reconstructions of the
        # benchmark targets at Overall 5.2 / COM 3.7 with two, 8.8 / 8.2 with one (BENCHMARKS.md). The tokenizer
        # and the autoencoder are made in the chain (model.bagel.bootstrap); vocab_size is the chain tokenizer's.
        return BagelConfig(
            llm=Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
            vit=SiglipConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
                             patch_size=8, image_size=32),
            vae=AutoencoderConfig(resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4),
            latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=4,
        )
    if name == "bagel-7b":
        return BagelConfig(
            llm=Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, rope_theta=1_000_000.0,
                            max_position_embeddings=32768),
            vit=SiglipConfig(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                             num_hidden_layers=27, patch_size=14, image_size=980),
            vae=AutoencoderConfig(),
            max_latent_size=64, vit_max_num_patch_per_side=70,
        )
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")


PRESETS = ("tiny", "bagel-7b")
