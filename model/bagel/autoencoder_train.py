"""Train the tiny preset's FLUX autoencoder on the subject world's images, inside the chain.

A BAGEL release brings FLUX's trained autoencoder; the embedded default has no such thing at 32 x 32, so it trains
a toy-size one here and writes it the way a release holds it (`ae.safetensors`, `ae_params.json`).

The objective is FLUX's (the LDM KL autoencoder's) without its perceptual and adversarial terms: a per-pixel L1 +
MSE reconstruction of the posterior sample and a small KL of the diagonal Gaussian posterior to N(0, I). LPIPS
needs pretrained VGG weights and a GAN needs a schedule of its own; neither pays off on flat-coloured 32 x 32
renders, where pixel losses already keep shapes and colours.

After training, `scale_factor` and `shift_factor` are set from the training latents (FLUX's convention:
latent = scale * (mean - shift), zero mean and unit variance overall), since rectified flow draws its noise from
N(0, I) and expects the data end of the path on the same scale.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from model.bagel.autoencoder import FluxAutoencoder
from model.bagel.config import AE_PARAMS, AutoencoderConfig
from model.bagel.release import AE_FILE

METRICS_FILE = "metrics.json"
# LDM's DiagonalGaussianDistribution clamps the log-variance here: exp() stays finite early in training.
_LOGVAR_RANGE = (-30.0, 20.0)
_EVAL_BATCH = 256
# Images the train-split PSNR and the latent statistics are measured on at most (the whole set at toy scale).
_STATS_IMAGES = 4096
_CURVE_POINTS = 20


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], i.e. (x / 255 - 0.5) / 0.5."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round()


def _as_array(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        arr = images
    else:
        # Single images [H, W, 3] or batches [n, H, W, 3], in any mix.
        parts = [np.asarray(a) for a in images]
        if not parts:
            raise ValueError("no images to train the autoencoder on")
        arr = np.concatenate([p[None] if p.ndim == 3 else p for p in parts])
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {arr.shape} dtype {arr.dtype}")
    if len(arr) == 0:
        raise ValueError("no images to train the autoencoder on")
    return arr


def _posterior(ae: FluxAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unscaled) posterior mean and clamped log-variance."""
    mean, logvar = ae.encoder(x).chunk(2, dim=1)
    return mean, logvar.clamp(*_LOGVAR_RANGE)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    # Short warmup (Adam's first moments are noisy on a fresh GroupNorm net), then cosine to a tenth: in runs of a
    # few hundred steps the decay is what brings the last few dB.
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def _raw_means(ae: FluxAutoencoder, images: np.ndarray) -> torch.Tensor:
    return torch.cat([_posterior(ae, _to_unit(images[i:i + _EVAL_BATCH]))[0]
                      for i in range(0, len(images), _EVAL_BATCH)])


@torch.no_grad()
def reconstruct(ae: FluxAutoencoder, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 reconstructions through `encode` / `decode` (the posterior mean, as BAGEL)."""
    images = _as_array(images)
    out = []
    for i in range(0, len(images), _EVAL_BATCH):
        x = _to_unit(images[i:i + _EVAL_BATCH])
        out.append(_to_uint8(ae.decode(ae.encode(x))).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image PSNR (dB) of uint8 images; identical images count as 100 dB."""
    diff = a.astype(np.float64) / 255.0 - b.astype(np.float64) / 255.0
    mse = (diff ** 2).reshape(len(diff), -1).mean(axis=1)
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def _split(n: int, holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_hold = 0
    if holdout > 0 and n >= 2:
        n_hold = min(max(1, round(n * holdout)), n - 1)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def train_autoencoder(images: np.ndarray | Iterable[np.ndarray], cfg: AutoencoderConfig, *, steps: int,
                      batch_size: int, lr: float, seed: int, progress: bool = False, kl_weight: float = 1e-6,
                      holdout: float = 0.1, warmup: int | None = None,
                      flip: bool = True) -> tuple[FluxAutoencoder, dict]:
    """Train a FLUX autoencoder of architecture `cfg` on uint8 images [N, H, W, 3] (or an iterable of images).

    Loss per image: sum over pixels of |x - x'| + (x - x')^2 (pixels in [-1, 1]) + kl_weight * the KL summed over
    the latent, divided by the pixel count so `lr` does not depend on the image size. kl_weight 1e-6 is the LDM /
    FLUX setting for that sum-over-pixels form: it only keeps the posterior from drifting, it does not regularise
    the latent toward N(0, I) (scale_factor / shift_factor do that). No LPIPS, no GAN (see the module docstring).

    A `holdout` fraction of the images (at least one when there are two or more) is kept out of training and
    measured. `flip` mirrors training images left-right at random (the subject world has no handedness).
    Deterministic for a seed at a fixed thread count; the caller's global RNG state is left as it was.

    Returns the trained autoencoder (eval mode) whose `config` is `cfg` with `scale_factor` / `shift_factor` set
    from the training split's posterior means, and a metrics dict (PSNR on the held-out and training images,
    the mean-image baseline on the held-out ones, loss curve, wall time).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}")
    arr = _as_array(images)
    h, w = arr.shape[1:3]
    if h % cfg.factor or w % cfg.factor:
        raise ValueError(f"images are {h} x {w}, not divisible by the autoencoder's downsampling x{cfg.factor}")
    started, cpu_started = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(seed)
    train_idx, hold_idx = _split(len(arr), holdout, rng)
    train, held = arr[train_idx], arr[hold_idx]
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    # FLUX's shipped factors would rescale latents of a net they were not measured on; train in raw space.
    base = cfg.model_copy(update={"scale_factor": 1.0, "shift_factor": 0.0})

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = FluxAutoencoder(base)
        noise = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.Adam(ae.parameters(), lr=lr)
        ae.train()
        pixels = 3 * h * w
        losses: list[float] = []
        order, pos = rng.permutation(len(train)), 0
        bar = tqdm(total=steps, desc="autoencoder", unit="step", disable=not progress)
        for step in range(steps):
            if pos + batch_size > len(order):
                # A fresh permutation per epoch: no image twice in an epoch; the few left over when batch_size
                # does not divide the set are left to the next permutation rather than padded with repeats.
                order, pos = rng.permutation(len(train)), 0
            take = order[pos:pos + batch_size] if batch_size <= len(order) else rng.integers(0, len(train), batch_size)
            pos += batch_size
            batch = train[take]
            if flip:
                mirrored = rng.random(len(batch)) < 0.5
                batch = np.where(mirrored[:, None, None, None], batch[:, :, ::-1], batch)
            x = _to_unit(batch)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup)
            mean, logvar = _posterior(ae, x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=noise)
            err = ae.decoder(z) - x
            rec = (err.abs() + err.square()).flatten(1).sum(1)
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
            loss = ((rec + kl_weight * kl) / pixels).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            if progress and (step + 1) % 100 == 0:  # a plain line too: orchestrators log prints, not bars
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                print(f"autoencoder: step {step + 1}/{steps} loss {np.mean(losses[-100:]):.4f}", flush=True)
        bar.close()
    ae.eval()

    stats_imgs = train[:_STATS_IMAGES]
    raw = _raw_means(ae, stats_imgs)
    shift = float(raw.mean())
    scale = 1.0 / max(float(raw.std()), 1e-8)
    trained_cfg = cfg.model_copy(update={"scale_factor": scale, "shift_factor": shift})
    ae.config = trained_cfg
    train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu_started

    scaled = (raw - shift) * scale
    window = max(1, min(10, steps // 10))
    every = max(1, steps // _CURVE_POINTS)
    metrics = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "kl_weight": kl_weight, "flip": flip,
        "z_channels": cfg.z_channels, "image_size": [int(h), int(w)],
        "train_images": int(len(train)), "holdout_images": int(len(held)),
        # CPU time is what a busy shared machine does not inflate; on one thread it is the idle-machine wall time.
        "wall_seconds": round(train_seconds, 3), "cpu_seconds": round(train_cpu, 3),
        "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
        "loss_curve": [[s, round(float(np.mean(losses[max(0, s - window + 1):s + 1])), 6)]
                       for s in range(every - 1, steps, every)],
        "psnr_train": psnr(reconstruct(ae, stats_imgs), stats_imgs),
        "psnr_holdout": psnr(reconstruct(ae, held), held) if len(held) else None,
        # Predicting the training split's mean image for every held-out image: what "learned nothing" scores.
        "psnr_holdout_mean_image": (psnr(np.broadcast_to(train.mean(0).round().astype(np.uint8), held.shape), held)
                                    if len(held) else None),
        "scale_factor": scale, "shift_factor": shift,
        "latent_mean": float(scaled.mean()), "latent_std": float(scaled.std()),
    }
    return ae, metrics


def images_from_datasets(data_root: str | Path, dataset_names: Sequence[str], limit: int | None = None, *,
                         size: int | None = None) -> np.ndarray:
    """Every image (references and targets) of built Scone-S2I datasets, as uint8 [N, H, W, 3].

    Order: datasets as named, their shards in parquet_info order, rows and each row's images as stored; an image
    whose pixels equal an earlier one's is dropped (the world reuses references across rows). `limit` caps the
    count of distinct images. `size` resizes images of another size to size x size (bicubic, as the trainer's
    batching does); without it, images of mixed sizes are an error.
    """
    import pyarrow.parquet as pq

    from data.formats import scone_s2i
    from model.batching import decode_image, square_image

    seen: set[bytes] = set()
    out: list[np.ndarray] = []
    for name in dataset_names:
        for path in scone_s2i.parquet_files(data_root, name):
            pf = pq.ParquetFile(path)
            if "image" not in pf.schema_arrow.names:
                raise ValueError(f"{scone_s2i.shard_name(data_root, path)} has no `image` column")
            for g in range(pf.num_row_groups):
                for encoded_list in pf.read_row_group(g, columns=["image"]).column("image").to_pylist():
                    for encoded in encoded_list or []:
                        img = decode_image(encoded)
                        if size is not None:
                            img = square_image(img, size, f"{name} image")
                        digest = bytes(img.shape) + img.tobytes()
                        if digest in seen:
                            continue
                        if out and img.shape != out[0].shape:
                            raise ValueError(f"{name}: image of shape {img.shape} after ones of {out[0].shape}; "
                                             "pass size= to resize them to one size")
                        seen.add(digest)
                        out.append(img)
                        if limit is not None and len(out) >= limit:
                            return np.stack(out)
    if not out:
        raise ValueError(f"no images in {', '.join(dataset_names)} under {data_root}")
    return np.stack(out)


def save_autoencoder(ae: FluxAutoencoder, cfg: AutoencoderConfig, out_dir: str | Path,
                     metrics: dict | None = None) -> Path:
    """Write the autoencoder as a release holds it: `ae.safetensors` (FluxAutoencoder's keys, no `ae.` prefix)
    and `ae_params.json`; plus `metrics.json` when metrics are given. Returns out_dir."""
    if ae.config != cfg:
        changed = sorted(k for k, v in cfg.model_dump().items() if ae.config.model_dump().get(k) != v)
        raise ValueError(f"cfg differs from the autoencoder's own config in {', '.join(changed)}: the saved "
                         "ae_params.json would not describe the weights (pass the cfg train_autoencoder returned)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in ae.state_dict().items()}
    save_file(state, str(out_dir / AE_FILE), metadata={"format": "pt"})
    cfg.to_json(out_dir / AE_PARAMS)
    if metrics is not None:
        (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir


def load_autoencoder(directory: str | Path) -> tuple[FluxAutoencoder, AutoencoderConfig]:
    """Read `ae.safetensors` + `ae_params.json` (FLUX's hyperparameters when the file is absent, as a release)."""
    directory = Path(directory)
    params = directory / AE_PARAMS
    cfg = AutoencoderConfig.from_json(params) if params.exists() else AutoencoderConfig()
    ae = FluxAutoencoder(cfg)
    ae.load_state_dict(load_file(str(directory / AE_FILE)), strict=True)
    ae.eval()
    return ae, cfg
