"""`scone bench autoencoder-ceiling`: the oracle's score of the targets and of their autoencoder reconstructions."""
import json

import numpy as np

from flows.params import load_params


def _params(tmp_path, release):
    return load_params("params.yaml", {
        "pipeline.artifacts": str(tmp_path / "artifacts"), "data.root": str(tmp_path / "artifacts" / "data"),
        "data.sizes.bench_per_task": "1", "model.release": str(release)})


def test_targets_score_full_marks_and_the_autoencoder_is_scored_below(bagel_release, tmp_path):
    from benchmarks.autoencoder_ceiling import run
    from data.build import build_dataset

    params = _params(tmp_path, bagel_release)
    build_dataset("sconeeval_bench", params.data)
    out = tmp_path / "bench" / "autoencoder-ceiling.json"
    out.parent.mkdir()
    result = run(params, out)
    assert result["ground_truth"]["Overall"] == 10.0 and result["ground_truth"]["COM"] == 10.0
    # the fixture's autoencoder is barely trained: its reconstructions lose subjects, so the ceiling drops
    assert 0.0 <= result["autoencoder"]["Overall"] < 10.0
    assert 5.0 < result["psnr_db"] < 60.0
    assert json.loads(out.read_text()) == result
    assert out.with_suffix(".png").exists() and result["n_cases"] == 6


def test_reconstruction_keeps_shape_and_dtype(bagel_release):
    from benchmarks.autoencoder_ceiling import psnr, reconstruct_targets

    targets = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    recon = reconstruct_targets(bagel_release, targets)
    assert recon.shape == targets.shape and recon.dtype == np.uint8
    assert psnr(targets, targets) == float("inf")
