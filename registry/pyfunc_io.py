"""The serving contract of a registered checkpoint (the `mlflow.pyfunc` flavour in `registry/pyfunc_model.py`).

Input: a DataFrame with `instruction` (str) and `reference_images` (a list of base64-encoded PNGs, possibly empty
or absent: text-to-image). Output: a DataFrame with `image` (base64 PNG). The sampling settings (steps, guidance
scales, bridge, seed) belong to the pipeline: they are stored in the logged model's `model_config` (the ones its
scores were measured with) and can be overridden per request through the signature's params.

This module imports no model code, so registration depends on the contract, not on the network behind it.
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

INSTRUCTION = "instruction"
REFERENCE_IMAGES = "reference_images"
IMAGE = "image"
CHECKPOINT_ARTIFACT = "checkpoint"
# Sampling settings a version carries (model_config) and a request may override (signature params).
SAMPLING_KEYS = ("steps", "cfg_text", "cfg_image", "bridge", "seed")
PIPELINE_KEY = "pipeline"  # model_config entry: model.pipeline.pipeline_settings (image size, references, bridge)
# The evaluation's defaults (evaluation.config.SamplingConfig, eval.seed), for callers that name none; the register
# step passes the settings the checkpoint was scored with.
DEFAULT_SAMPLING = {"steps": 16, "cfg_text": 3.0, "cfg_image": 1.5, "bridge": False, "seed": 0}
_TYPES = {"steps": int, "cfg_text": float, "cfg_image": float, "bridge": bool, "seed": int}


def sampling_settings(config: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The five sampling settings from a model_config, with per-request overrides; a missing one is an error."""
    merged = {**(config or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    missing = [k for k in SAMPLING_KEYS if k not in merged]
    if missing:
        raise ValueError(f"sampling settings missing: {', '.join(missing)} (log the model with model_config "
                         f"holding {', '.join(SAMPLING_KEYS)})")
    out = {}
    for key in SAMPLING_KEYS:
        value = merged[key]
        if _TYPES[key] is bool and isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes")
        out[key] = _TYPES[key](value)
    return out


def encode_png(image: np.ndarray) -> str:
    """uint8 H x W x 3 -> base64 PNG text."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str | bytes) -> np.ndarray:
    """base64 PNG (or any PIL-readable image) -> uint8 H x W x 3."""
    from PIL import Image

    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"reference image is not valid base64 ({e})") from None
    with Image.open(io.BytesIO(raw)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def reference_list(value: Any) -> list[str]:
    """A `reference_images` cell as a list of strings: a list or array of them; None/NaN/missing -> []."""
    if value is None:
        return []
    if isinstance(value, float) and value != value:
        return []
    if isinstance(value, str):
        # a JSON-encoded list (CSV-style clients) or a single image
        text = value.strip()
        if text.startswith("["):
            return [str(v) for v in json.loads(text)]
        return [text] if text else []
    return [str(v) for v in list(value)]


def signature(sampling: Mapping[str, Any]):
    """Explicit ModelSignature: string `instruction`, optional array-of-string `reference_images` -> string
    `image`; params = the sampling settings, their defaults the version's own."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    dtypes = {int: DataType.long, float: DataType.double, bool: DataType.boolean}
    settings = sampling_settings(sampling)
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, INSTRUCTION),
                       ColSpec(Array(DataType.string), REFERENCE_IMAGES, required=False)]),
        outputs=Schema([ColSpec(DataType.string, IMAGE)]),
        params=ParamSchema([ParamSpec(k, dtypes[_TYPES[k]], settings[k]) for k in SAMPLING_KEYS]),
    )


def image_size(checkpoint_dir: Path) -> int:
    """The side of a release's images when no pipeline settings name one: its ViT's (`vit_config.json`), the side
    model.pipeline generates at by default; 32 (the subject world's) when unreadable."""
    try:
        return int(json.loads((Path(checkpoint_dir) / "vit_config.json").read_text()).get("image_size", 32))
    except (OSError, ValueError, AttributeError, TypeError):
        return 32


def input_example(size: int = 32):
    """One request: an instruction with one reference (a red square on grey), as the benchmark's cases look."""
    import pandas as pd

    ref = np.full((size, size, 3), 128, dtype=np.uint8)
    ref[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (220, 40, 40)
    return pd.DataFrame({INSTRUCTION: ["put the red square on the beach"], REFERENCE_IMAGES: [[encode_png(ref)]]})
