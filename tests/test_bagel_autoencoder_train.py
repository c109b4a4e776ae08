"""Training the toy-size FLUX autoencoder in the chain (model.bagel.autoencoder_train).

The synthetic set stands in for the subject world: one flat-coloured square or disc on a flat background, at
16 x 16 so a few seconds of one CPU thread train the tiny preset's architecture far past the mean image.
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data.formats.scone_s2i import write_rows
from model.bagel import autoencoder_train as at
from model.bagel.config import preset

FIXTURE_RELEASE = Path(__file__).parent / "data" / "bagel-tiny" / "release"
SIZE = 16
CFG = preset("tiny").vae.model_copy(update={"resolution": SIZE})
PALETTE = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [240, 220, 40], [250, 250, 250], [20, 20, 20],
                    [160, 60, 200], [250, 140, 30]], dtype=np.uint8)
# The world's backgrounds are muted (sky, grey, night, light); objects take the saturated palette.
BACKGROUNDS = np.array([[150, 190, 230], [120, 120, 130], [40, 40, 80], [210, 210, 220]], dtype=np.uint8)


@pytest.fixture(autouse=True)
def _one_thread():
    # The trainer is deterministic at a fixed thread count, and the test machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _shapes(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        bg, fg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))], PALETTE[rng.integers(len(PALETTE))]
        r = rng.integers(size // 6, size // 3 + 1)
        cy, cx = rng.integers(r, size - r, 2)
        if i % 2:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        out[i] = np.where(inside[..., None], fg, bg)
    return out


IMAGES = _shapes(40, seed=0)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return at.train_autoencoder(IMAGES, CFG, steps=100, batch_size=8, lr=2e-3, seed=0, holdout=0.2)


def test_short_run_lowers_the_loss_and_beats_the_mean_image(trained):
    ae, m = trained
    assert m["train_images"] == 32 and m["holdout_images"] == 8
    assert m["loss_last"] < 0.7 * m["loss_first"]
    # A net that learned nothing about the images does no better than their mean.
    assert m["psnr_holdout"] > m["psnr_holdout_mean_image"] + 1.0
    assert m["psnr_train"] > m["psnr_holdout_mean_image"] + 2.0
    assert len(m["loss_curve"]) == 20 and m["loss_curve"][-1][0] == 99


def test_scale_and_shift_make_the_training_latents_standard():
    ae, m = at.train_autoencoder(IMAGES, CFG, steps=3, batch_size=8, lr=1e-3, seed=1, holdout=0.0)
    cfg = ae.config
    assert m["holdout_images"] == 0 and m["psnr_holdout"] is None
    assert (cfg.scale_factor, cfg.shift_factor) != (CFG.scale_factor, CFG.shift_factor)
    assert cfg.model_dump(exclude={"scale_factor", "shift_factor"}) == CFG.model_dump(
        exclude={"scale_factor", "shift_factor"})
    with torch.no_grad():
        lat = ae.encode(at._to_unit(IMAGES))
    assert lat.shape == (len(IMAGES), CFG.z_channels, SIZE // CFG.factor, SIZE // CFG.factor)
    assert abs(float(lat.mean())) < 1e-4 and abs(float(lat.std()) - 1.0) < 1e-4
    # decode undoes the scaling: the same images come back as through the raw encoder / decoder.
    with torch.no_grad():
        raw = ae.decoder(ae.encoder(at._to_unit(IMAGES[:4])).chunk(2, dim=1)[0])
        assert torch.allclose(ae.decode(lat[:4]), raw, atol=1e-5)


def test_same_seed_same_autoencoder_other_seed_other_one():
    runs = [at.train_autoencoder(IMAGES[:16], CFG, steps=4, batch_size=4, lr=1e-3, seed=s)[0] for s in (5, 5, 6)]
    a, b, c = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].config == runs[1].config
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_caller_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    at.train_autoencoder(IMAGES[:8], CFG, steps=1, batch_size=4, lr=1e-3, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_accepts_an_iterable_of_images_and_rejects_bad_input():
    ae, m = at.train_autoencoder(iter(list(IMAGES[:6])), CFG, steps=1, batch_size=2, lr=1e-3, seed=0)
    assert m["train_images"] + m["holdout_images"] == 6
    with pytest.raises(ValueError, match="uint8"):
        at.train_autoencoder(IMAGES.astype(np.float32), CFG, steps=1, batch_size=2, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        at.train_autoencoder(IMAGES[:, :15, :15], CFG, steps=1, batch_size=2, lr=1e-3, seed=0)  # not a multiple of 2


def test_save_load_round_trip_is_exact(trained, tmp_path):
    ae, m = trained
    at.save_autoencoder(ae, ae.config, tmp_path, metrics=m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.safetensors", "ae_params.json", "metrics.json"]
    stored = load_file(str(tmp_path / "ae.safetensors"))
    assert set(stored) == set(ae.state_dict()) and not any(k.startswith("ae.") for k in stored)
    loaded, cfg = at.load_autoencoder(tmp_path)
    assert cfg == ae.config and loaded.config == ae.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ae.state_dict().items())
    np.testing.assert_array_equal(at.reconstruct(loaded, IMAGES[:5]), at.reconstruct(ae, IMAGES[:5]))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["psnr_holdout"] == m["psnr_holdout"] and saved["steps"] == 100 and saved["wall_seconds"] > 0


def test_files_are_a_release_autoencoder(tmp_path):
    # The fixture release was written by the public BAGEL code: reading it and writing it back must give its
    # ae.safetensors (same keys, shapes, values) and its ae_params.json.
    ae, cfg = at.load_autoencoder(FIXTURE_RELEASE)
    at.save_autoencoder(ae, cfg, tmp_path)
    theirs, ours = load_file(str(FIXTURE_RELEASE / "ae.safetensors")), load_file(str(tmp_path / "ae.safetensors"))
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert (json.loads((tmp_path / "ae_params.json").read_text())
            == json.loads((FIXTURE_RELEASE / "ae_params.json").read_text()))
    assert not (tmp_path / "metrics.json").exists()


def test_save_refuses_a_config_that_does_not_describe_the_weights(trained, tmp_path):
    ae, _ = trained
    with pytest.raises(ValueError, match="scale_factor"):
        at.save_autoencoder(ae, ae.config.model_copy(update={"scale_factor": 0.5}), tmp_path)
    assert not (tmp_path / "ae.safetensors").exists()


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_images_from_datasets_reads_refs_and_targets_in_order_without_duplicates(tmp_path):
    imgs = _shapes(7, seed=3, size=32)
    rows_a = [{"image": [_png(imgs[0]), _png(imgs[1])], "instruction": "a0", "key": "a0"},
              {"image": [_png(imgs[0]), _png(imgs[2]), _png(imgs[3])], "instruction": "a1", "key": "a1"},
              {"image": [_png(imgs[4])], "instruction": "a2", "key": "a2"}]
    rows_b = [{"image": [_png(imgs[3]), _png(imgs[5])], "instruction": "b0", "key": "b0"},
              {"image": [_png(imgs[6]), _png(imgs[1])], "instruction": "b1", "key": "b1"}]
    root = tmp_path / "data"
    # one row per row group and file, so reading must cross groups and shards in parquet_info's order
    write_rows(rows_a, root, "a", rows_per_row_group=1, rows_per_file=2)
    write_rows(rows_b, root, "b", rows_per_row_group=2)
    got = at.images_from_datasets(root, ["a", "b"])
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(at.images_from_datasets(root, ["b", "a"]), imgs[[3, 5, 6, 1, 0, 2, 4]])
    np.testing.assert_array_equal(at.images_from_datasets(root, ["a", "b"], limit=4), imgs[:4])
    assert got.dtype == np.uint8


def test_images_from_datasets_sizes(tmp_path):
    small, big = _shapes(1, seed=4, size=16)[0], _shapes(1, seed=5, size=32)[0]
    write_rows([{"image": [_png(big), _png(small)], "instruction": "x", "key": "k"}], tmp_path, "mixed",
               rows_per_row_group=1)
    with pytest.raises(ValueError, match="size="):
        at.images_from_datasets(tmp_path, ["mixed"])
    got = at.images_from_datasets(tmp_path, ["mixed"], size=32)
    assert got.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(got[0], big)
    with pytest.raises(FileNotFoundError):
        at.images_from_datasets(tmp_path, ["absent"])
