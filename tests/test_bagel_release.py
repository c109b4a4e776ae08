"""Release directories: strict loading that names what is wrong, and exact save/load round trips."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.bagel.release import ReleaseError, find_weights, load_release, save_release

FIXTURE = Path(__file__).parent / "data" / "bagel-tiny"


@pytest.fixture(scope="module")
def release():
    return load_release(FIXTURE / "release")


def _copy_release(tmp_path) -> Path:
    target = tmp_path / "release"
    shutil.copytree(FIXTURE / "release", target)
    return target


def test_loads_every_manifest_key_with_its_shape(release):
    manifest = json.loads((FIXTURE / "weights_manifest.json").read_text())
    state = {k: v for k, v in release.model.state_dict().items() if not k.startswith("ae.")}
    assert {k: list(v.shape) for k, v in state.items()} == manifest
    assert release.weights.name == "ema.safetensors" and not release.weights.sharded
    # grid sizes come from the stored sin-cos tables, the rest from the config files
    cfg = release.model.config
    assert (cfg.max_latent_size, cfg.vit_max_num_patch_per_side) == (16, 16)
    assert cfg.vit.used_layers == 2 and len(release.model.vit_model.vision_model.encoder.layers) == 2
    assert cfg.vae.z_channels == 4 and cfg.latent_downsample == 16
    assert not any(t.is_meta for t in list(release.model.parameters()) + list(release.model.buffers()))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    directory = _copy_release(tmp_path)
    weights = load_file(str(directory / "ema.safetensors"))
    del weights["llm2vae.bias"]
    weights["language_model.model.layers.9.mlp.gate_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, str(directory / "ema.safetensors"))
    with pytest.raises(ReleaseError) as err:
        load_release(directory)
    message = str(err.value)
    assert "missing keys: llm2vae.bias" in message
    assert "unexpected keys: language_model.model.layers.9.mlp.gate_proj.weight" in message


def test_shape_mismatch_and_ae_keys_are_named(tmp_path):
    directory = _copy_release(tmp_path)
    weights = load_file(str(directory / "ema.safetensors"))
    weights["vae2llm.bias"] = torch.zeros(65)
    save_file(weights, str(directory / "ema.safetensors"))
    with pytest.raises(ReleaseError, match=r"shape mismatches: vae2llm.bias \[65\] \(model \[64\]\)"):
        load_release(directory)

    directory = _copy_release(tmp_path / "ae")
    ae = load_file(str(directory / "ae.safetensors"))
    del ae["decoder.conv_out.bias"]
    save_file(ae, str(directory / "ae.safetensors"))
    with pytest.raises(ReleaseError, match=r"ae.safetensors: missing keys: decoder.conv_out.bias"):
        load_release(directory)


def test_two_weight_files_are_ambiguous(tmp_path):
    directory = _copy_release(tmp_path)
    shutil.copy(directory / "ema.safetensors", directory / "model.safetensors")
    with pytest.raises(ReleaseError, match="ambiguous"):
        find_weights(directory)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_round_trip_unsharded_as_model_safetensors(release, tmp_path):
    out = save_release(release.model, tmp_path / "out", weights_name="model.safetensors",
                       tokenizer_from=release.directory)
    assert (out / "model.safetensors").exists() and (out / "ae.safetensors").exists()
    assert not list(out.glob("*.index.json"))
    for name in ("llm_config.json", "vit_config.json", "ae_params.json"):
        assert json.loads((out / name).read_text()) == json.loads((FIXTURE / "release" / name).read_text())
    again = load_release(out)
    assert again.weights.name == "model.safetensors"
    _assert_same_weights(release.model, again.model)
    assert again.model.special == release.model.special


def test_round_trip_sharded(release, tmp_path):
    out = save_release(release.model, tmp_path / "out", weights_name="ema.safetensors", max_shard_bytes=300_000,
                       tokenizer_from=release.directory)
    index = json.loads((out / "ema.safetensors.index.json").read_text())
    shards = sorted(out.glob("ema-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "ema.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["weight_map"].keys() == json.loads((FIXTURE / "weights_manifest.json").read_text()).keys()
    for shard in shards:  # the limit holds except for a tensor larger than it
        tensors = load_file(str(shard))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 300_000 or len(tensors) == 1
    again = load_release(out)
    assert again.weights.sharded
    _assert_same_weights(release.model, again.model)


def test_saving_over_existing_weights_is_refused(release, tmp_path):
    save_release(release.model, tmp_path / "out", tokenizer_from=release.directory)
    with pytest.raises(ReleaseError, match="already holds weights"):
        save_release(release.model, tmp_path / "out", tokenizer_from=release.directory)


def test_loads_to_target_dtype(tmp_path):
    loaded = load_release(FIXTURE / "release", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    # non-persistent buffers are rebuilt on the device, not left on meta
    assert loaded.model.language_model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_tiny_preset_round_trips_through_a_release_directory(tmp_path):
    """The embedded default's architecture (latent patch 2, one downsampling) is recovered from its files alone."""
    from model.bagel.config import preset
    from model.bagel.model import BagelModel
    from model.bagel.config import BagelConfig
    from model.bagel.release import _shapes, find_weights, save_release

    tiny = preset("tiny")
    model = BagelModel(tiny)
    model.init_fresh()
    save_release(model, tmp_path / "rel")
    loaded = BagelConfig.from_release(tmp_path / "rel", _shapes(find_weights(tmp_path / "rel").files))
    assert loaded == tiny
    assert (tiny.latent_downsample, tiny.patch_latent_dim) == (4, 16)
