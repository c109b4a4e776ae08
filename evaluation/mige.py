"""MIGEBench / editing metrics (MIGE paper Sec. 4.2, Tables 1-3): L1, L2, DINO, CLIP-I, CLIP-T, CLIP-dir.

* L1, L2: mean absolute and mean squared pixel difference, images scaled to [0, 1] (the Emu Edit /
  MagicBrush convention behind MIGE Table 2: L2 < L1 there because it is a mean of squares).
* DINO: cosine similarity of the DINO CLS embeddings (final layer-normed CLS token) of two images.
* CLIP-I: cosine similarity of the CLIP image embeddings (projected) of two images.
* CLIP-T: cosine similarity of the CLIP image embedding of the generated image and the CLIP text
  embedding of a caption (the target caption when editing, the prompt for subject-driven generation).
* CLIP-dir: directional similarity, the cosine between the image change and the caption change,
  (E_I(generated) - E_I(source)) vs (E_T(target caption) - E_T(source caption)), each embedding
  L2-normalised before the difference. Positive when the edit moves the image the way the captions move.

What "the reference" is depends on the benchmark: MIGEBench (Sec. 4.2.3) compares the output with the
ground-truth edited image; the Emu Edit protocol compares it with the source image; subject preservation
compares the cropped subject with the input subject image. `case_metrics` takes that image as `reference`.

Encoders load from LOCAL directories only (transformers `from_pretrained`, no hub access): a CLIP
directory (CLIPModel weights + image processor + tokenizer, e.g. openai/clip-vit-large-patch14 saved with
save_pretrained) and a DINO directory (Dinov2Model or ViTModel weights + image processor, e.g.
facebook/dinov2-base or facebook/dino-vits16). L1 and L2 need no encoder.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

METRICS = ("L1", "L2", "DINO", "CLIP-I", "CLIP-T", "CLIP-dir")


class EncoderNotFoundError(FileNotFoundError):
    """An encoder directory is missing or incomplete; the message names the path and the fix."""


# ---------------------------------------------------------------- pixels


def to_unit_array(image) -> np.ndarray:
    """H x W x 3 float64 in [0, 1] from a PIL image, a uint8 array or a float array already in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
            raise ValueError(f"float images must lie in [0, 1], got values in [{arr.min():.3f}, {arr.max():.3f}]")
        return arr.astype(np.float64)
    raise ValueError(f"unsupported image dtype {arr.dtype}: pass uint8 (0-255) or float in [0, 1]")


def _pair(a, b, resize: bool) -> tuple[np.ndarray, np.ndarray]:
    x, y = to_unit_array(a), to_unit_array(b)
    if x.shape != y.shape:
        if not resize:
            raise ValueError(
                f"image sizes differ ({x.shape} vs {y.shape}); pass resize=True to resize the first to the second"
            )
        h, w = y.shape[:2]
        resized = Image.fromarray(np.rint(x * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        x = np.asarray(resized, dtype=np.float64) / 255.0
    return x, y


def pixel_l1(a, b, resize: bool = False) -> float:
    """Mean |a - b| over pixels and channels, images in [0, 1]."""
    x, y = _pair(a, b, resize)
    return float(np.abs(x - y).mean())


def pixel_l2(a, b, resize: bool = False) -> float:
    """Mean (a - b)^2 over pixels and channels, images in [0, 1]."""
    x, y = _pair(a, b, resize)
    return float(((x - y) ** 2).mean())


# ---------------------------------------------------------------- embeddings


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def cosine(a, b) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] (or [D]) embedding arrays."""
    a, b = torch.as_tensor(np.asarray(a, dtype=np.float64)), torch.as_tensor(np.asarray(b, dtype=np.float64))
    return (_normalise(a) * _normalise(b)).sum(-1).numpy()


def clip_direction(img_generated, img_source, text_target, text_source) -> np.ndarray:
    """CLIP-dir from embeddings ([N, D] each): cosine(norm(gen) - norm(src), norm(tgt) - norm(src_caption)).
    0 where either change is zero (no direction to compare)."""
    def unit(x):
        return _normalise(torch.as_tensor(np.asarray(x, np.float64)))

    di = unit(img_generated) - unit(img_source)
    dt = unit(text_target) - unit(text_source)
    return torch.nn.functional.cosine_similarity(di, dt, dim=-1, eps=1e-12).numpy()


def _check_dir(path: str | Path | None, what: str, example: str) -> Path:
    fix = (
        f"MIGE metrics load the {what} encoder from a local directory (nothing is downloaded): on a machine with the "
        f"weights run `{example}.from_pretrained(NAME).save_pretrained(DIR)` and the same for its processor/tokenizer, "
        f"copy DIR here and pass it as the {what} path"
    )
    if path is None:
        raise EncoderNotFoundError(f"no {what} encoder path given; {fix}")
    path = Path(path)
    if not path.is_dir():
        raise EncoderNotFoundError(f"{what} encoder directory {path} does not exist; {fix}")
    if not (path / "config.json").is_file():
        raise EncoderNotFoundError(f"{path} holds no config.json, so it is no saved {what} model; {fix}")
    return path


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pil(images) -> list[Image.Image]:
    return [Image.fromarray(np.rint(to_unit_array(im) * 255).astype(np.uint8)) for im in images]


class ClipEncoder:
    """CLIP image and text embeddings (projected, L2-normalised) from a local CLIPModel directory."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = _check_dir(path, "CLIP", "transformers.CLIPModel")
        self.path, self.device, self.batch_size = path, torch.device(device), batch_size
        self.model = CLIPModel.from_pretrained(str(path)).to(self.device).eval()
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(str(path))
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise EncoderNotFoundError(
                f"{path}: CLIP weights found but no image processor / tokenizer ({e}); save them beside the model "
                f"with CLIPProcessor.from_pretrained(NAME).save_pretrained(DIR)"
            ) from None

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        outs = []
        for i in range(0, len(images), self.batch_size):
            px = self.image_processor(images=_pil(images[i : i + self.batch_size]), return_tensors="pt")["pixel_values"]
            outs.append(_normalise(_pooled(self.model.get_image_features(pixel_values=px.to(self.device)))).cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        outs = []
        max_len = self.model.config.text_config.max_position_embeddings
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True, max_length=max_len,
                return_tensors="pt",
            )
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
            outs.append(_normalise(_pooled(feats)).cpu())
        return torch.cat(outs)


class DinoEncoder:
    """DINO CLS embeddings (L2-normalised) from a local Dinov2Model / ViTModel directory."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoModel

        path = _check_dir(path, "DINO", "transformers.AutoModel")
        self.path, self.device, self.batch_size = path, torch.device(device), batch_size
        self.model = AutoModel.from_pretrained(str(path)).to(self.device).eval()
        if self.model.config.model_type not in ("dinov2", "vit", "dinov2_with_registers", "dinov3_vit"):
            raise EncoderNotFoundError(
                f"{path}: a {self.model.config.model_type!r} model; the DINO metric needs a DINO ViT "
                "(Dinov2Model or ViTModel)"
            )
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise EncoderNotFoundError(
                f"{path}: no image processor saved beside the DINO model ({e}); "
                "save one with AutoImageProcessor.save_pretrained(DIR)"
            ) from None

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        outs = []
        for i in range(0, len(images), self.batch_size):
            px = self.image_processor(images=_pil(images[i : i + self.batch_size]), return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=px.to(self.device)).last_hidden_state
            outs.append(_normalise(hidden[:, 0]).cpu())
        return torch.cat(outs)


class MigeMetrics:
    """The six metrics for lists of cases. Encoders are optional: without a CLIP (DINO) path the CLIP (DINO)
    metrics are left out; L1 and L2 are always there."""

    def __init__(self, clip_path: str | Path | None = None, dino_path: str | Path | None = None, device: str = "cpu"):
        self.clip = ClipEncoder(clip_path, device) if clip_path is not None else None
        self.dino = DinoEncoder(dino_path, device) if dino_path is not None else None

    def case_metrics(
        self,
        generated: Sequence,
        reference: Sequence,
        *,
        captions: Sequence[str] | None = None,
        sources: Sequence | None = None,
        source_captions: Sequence[str] | None = None,
        resize: bool = True,
    ) -> list[dict[str, float]]:
        """Per case: L1, L2 (generated vs reference; with resize the generated image is first resized to the
        reference's size), DINO, CLIP-I (generated vs reference), CLIP-T (generated vs caption) and CLIP-dir
        (needs sources, source_captions and captions)."""
        n = len(generated)
        named = (("reference", reference), ("captions", captions), ("sources", sources),
                 ("source_captions", source_captions))
        for name, seq in named:
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries for {n} generated images; give one per case")
        rows = [{"L1": pixel_l1(g, r, resize), "L2": pixel_l2(g, r, resize)} for g, r in zip(generated, reference)]
        if self.dino is not None and n:
            sims = cosine(self.dino.image_embeddings(generated), self.dino.image_embeddings(reference))
            for row, s in zip(rows, sims):
                row["DINO"] = float(s)
        if self.clip is not None and n:
            gen = self.clip.image_embeddings(generated)
            for row, s in zip(rows, cosine(gen, self.clip.image_embeddings(reference))):
                row["CLIP-I"] = float(s)
            if captions is not None:
                tgt = self.clip.text_embeddings(captions)
                for row, s in zip(rows, cosine(gen, tgt)):
                    row["CLIP-T"] = float(s)
                if sources is not None and source_captions is not None:
                    src_img = self.clip.image_embeddings(sources)
                    src_txt = self.clip.text_embeddings(source_captions)
                    for row, s in zip(rows, clip_direction(gen, src_img, tgt, src_txt)):
                        row["CLIP-dir"] = float(s)
        return rows


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the cases that have it (the benchmark figure)."""
    out = {}
    for m in METRICS:
        vals = [r[m] for r in rows if m in r and not math.isnan(r[m])]
        if vals:
            out[m] = float(np.mean(vals))
    out["n_cases"] = len(rows)
    return out
