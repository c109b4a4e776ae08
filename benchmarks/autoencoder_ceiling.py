"""`scone bench autoencoder-ceiling`: the best SconeEval score any checkpoint of a release can reach.

Every image the model draws leaves through the release's autoencoder decoder, so no checkpoint can beat the
autoencoder's own reconstruction of the right answer. This scores, with the oracle judge and the SconeEval protocol
(one sampling round: nothing is sampled), two "models" on the held-out benchmark:

- `ground_truth`: the rendered targets themselves (the judge's own ceiling; 10 by construction of the oracle);
- `autoencoder`: each target encoded and decoded by the release's autoencoder (the posterior mean, as the sampler
  decodes), i.e. the ceiling of every checkpoint trained on that release.

It also reports the reconstructions' PSNR against the targets and writes a picture (targets above, reconstructions
below) beside the JSON. This is how the tiny preset's autoencoder was chosen (docs/architecture.md).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tasks.params import Params

SHOWN = 12  # cases in the picture


def reconstruct_targets(release: Path, targets: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] targets through the release's autoencoder at the model's image side."""
    import torch

    from model.pipeline import load_pipeline

    pipe = load_pipeline(release)
    model = pipe.model
    x = torch.from_numpy(np.ascontiguousarray(targets)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        y = model.ae_decode(model.ae_encode(x.to(model.vae2llm.weight.dtype)))
    return ((y.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def run(params: Params, out: Path) -> dict:
    from PIL import Image

    from data.formats.sconeeval import read_bench
    from evaluation.judges import make_judge
    from evaluation.runner import evaluate_checkpoint
    from tasks.paths import Paths

    paths = Paths.from_params(params)
    release = paths.release(params)
    bench = paths.sconeeval_bench
    cases = read_bench(bench)
    if not cases:
        raise ValueError(f"{bench}: no benchmark cases (build them first: scone data build sconeeval_bench)")
    targets = np.stack([np.asarray(Image.open(bench / "targets" / f"{c.key}.png").convert("RGB")) for c in cases])
    t0 = time.perf_counter()
    recon = reconstruct_targets(release, targets)
    encode_decode_s = time.perf_counter() - t0

    eval_cfg = params.eval.model_copy(update={"judge": "oracle", "rounds": 1, "scorings": 1})
    judge = make_judge("oracle", eval_cfg)
    scores_dir = out.parent / f"{out.stem}_scores"
    result = {"release": str(release), "bench": str(bench), "n_cases": len(cases), "judge": "oracle",
              "psnr_db": round(psnr(recon, targets), 3), "encode_decode_s": round(encode_decode_s, 3)}
    for name, images in (("ground_truth", targets), ("autoencoder", recon)):
        summary = evaluate_checkpoint(lambda examples, seed, images=images: list(images), cases, scores_dir, name,
                                      eval_cfg, judge)
        result[name] = {k: round(float(v), 4) for k, v in summary["average"].items()}
        result[f"{name}_per_task"] = {t: {k: round(float(v), 4) for k, v in row.items()}
                                      for t, row in summary["per_task"].items()}

    picture = out.with_suffix(".png")
    shown = min(SHOWN, len(cases))
    grid = np.concatenate([np.concatenate(list(targets[:shown]), 1), np.concatenate(list(recon[:shown]), 1)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(picture)
    result["picture"] = str(picture)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result
