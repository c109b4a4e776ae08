"""`scone model inspect`: BAGEL-7B-MoT's size from the preset, built on the meta device."""
from model.bagel.config import preset
from model.bagel.inspect import inspect_preset, memory_plan
from flows.cli import main


def test_bagel_7b_counts():
    counts = inspect_preset("bagel-7b")["counts"]
    # 14B in the MoT language model (two experts), 7B active: a text token goes through a whole Qwen2.5-7B
    # (7.6B with embedding and head), a latent token through the generation expert (6.5B)
    assert abs(counts.language_model / 14e9 - 1) < 0.03
    assert abs(counts.total / 14e9 - 1) < 0.06
    assert abs(counts.active_text_token / 7.6e9 - 1) < 0.01
    assert abs(counts.active_latent_token / 7e9 - 1) < 0.07
    assert counts.understanding_layers == counts.generation_layers
    assert 0.4e9 < counts.vit < 0.45e9  # SigLIP so400m minus its last layer, plus the connector


def test_memory_plan_divides_over_gpus():
    counts = inspect_preset("bagel-7b")["counts"]
    one, eight = memory_plan(counts, 1), memory_plan(counts, 8)
    assert abs(one["total"] / eight["total"] - 8) < 1e-9
    trainable = counts.total - counts.vit - counts.autoencoder
    assert abs(one["fp32 Adam moments"] * 1024 ** 3 - 8 * trainable) < 1
    assert abs(one["bf16 weights"] * 1024 ** 3 - 2 * counts.total) < 1


def test_inspect_command(capsys):
    assert main(["model", "inspect", "--preset", "bagel-7b", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "language model (MoT, both experts)" in out and "14.141 B" in out and "ZeRO-3 over 8 GPU(s)" in out


def test_presets_are_consistent():
    cfg = preset("bagel-7b")
    assert cfg.llm.head_dim == 128 and cfg.vit.used_layers == 26 and cfg.latent_downsample == 16
    assert preset("tiny").patch_latent_dim == 16 and preset("tiny").latent_downsample == 4  # 2 x 2 patches of 4
