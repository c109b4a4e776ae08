import json

import numpy as np
import pytest
from PIL import Image

from data.formats.srum_rewards import read_rewards
from data.scene import Placement, Scene, Subject
from evaluation.config import SamplingConfig
from data.render import render_array
from evaluation.srum import candidate_seed, run_round
from model.config import ModelConfig, SrumConfig
from model.pipeline import BagelPipeline, load_pipeline
from model.reward_map import reward_map, to_latent_grid
from release_edit import VELOCITY_HEAD, copy_with_weights, random_normal


def prompt_rows():
    red, blue = Subject("u1", "object", "circle", "red"), Subject("u2", "object", "square", "blue")
    target = Scene("beach", (Placement(red, (2, 13, 15, 26)), Placement(blue, (17, 13, 30, 26))), 32)
    return [
        {"key": "s0", "category": "spatial", "prompt": "a red circle on the left of a blue square at the beach",
         "target": target, "layout_specified": True},
        {"key": "s1", "category": "shape", "prompt": "a red circle and a blue square at the beach",
         "target": target, "layout_specified": False},
    ]


def swapped(scene: Scene) -> Scene:
    a, b = scene.placements
    return Scene(scene.background, (Placement(a.subject, b.bbox), Placement(b.subject, a.bbox)), scene.size)


def tiny_checkpoint(release, directory):
    """A copy of the tiny release as a stage's checkpoint, its velocity head random (a fresh head is zero: sample
    something); returns (the ModelConfig the chain runs it with: 32 px, the bridge within its 4 layers, the
    directory)."""
    return ModelConfig(), copy_with_weights(release, directory, {VELOCITY_HEAD: random_normal(0.1, 0)})


@pytest.mark.slow
def test_run_round_end_to_end(bagel_release, tmp_path, monkeypatch):
    cfg, init = tiny_checkpoint(bagel_release, tmp_path / "init")
    srum = SrumConfig(candidates=2, steps=2, micro_batch=2, warmup_steps=1, judge="oracle")
    sampling = SamplingConfig(steps=2, cfg_text=1.0, cfg_image=1.0, batch_size=4)

    # candidate 0 is the exact target, candidate 1 has the two subjects swapped; the real sampler must be
    # called with the round's settings (checked here) but an untrained model would only draw noise
    rows = prompt_rows()
    calls = []

    def fake_generate(self, examples, *, steps, cfg_text, cfg_image, seed, bridge, batch_size):
        calls.append((seed, steps, cfg_text, bridge, [e.instruction for e in examples]))
        first = seed == candidate_seed(srum.seed, 1, 0)
        return [render_array(r["target"] if first else swapped(r["target"])) for r in rows]

    # the pipeline the round loads from the checkpoint, its sampling replaced (the contract evaluation.srum uses)
    monkeypatch.setattr(BagelPipeline, "generate", fake_generate)
    summary = run_round(init, rows, srum, sampling, tmp_path / "srum", 1, ckpt_dir=tmp_path / "ckpt",
                        model_cfg=cfg)

    round_dir = tmp_path / "srum" / "round_1"
    records = read_rewards(round_dir / "rewards.jsonl")
    assert len(records) == 4 and summary["records"] == 4
    assert [(r["key"], r["candidate"]) for r in records] == [("s0", 0), ("s0", 1), ("s1", 0), ("s1", 1)]
    assert records[0]["seed"] != records[1]["seed"] and records[0]["seed"] == records[2]["seed"]
    for r in records:
        assert r["vlm_rewards"][0]["object"] == "global_layout_reward"
        assert -1.0 <= r["vlm_rewards"][0]["score"] <= 1.0
        img = np.asarray(Image.open(round_dir / r["image"]))
        assert img.shape == (32, 32, 3)
    assert [c[0] for c in calls] == [candidate_seed(0, 1, 0), candidate_seed(0, 1, 1)]
    assert calls[0][1:4] == (2, 1.0, False) and calls[0][4] == [r["prompt"] for r in rows]
    globals_ = [r["vlm_rewards"][0]["score"] for r in records]
    # stated layout: right 1.0, swapped -1.0; no stated layout: 0.4 both (the neutral band's top)
    assert globals_ == pytest.approx([1.0, -1.0, 0.4, 0.4])
    assert all(len(r["vlm_rewards"]) == 3 for r in records)  # the two subjects, found as regions

    maps = np.load(round_dir / "reward_maps.npy")
    assert maps.shape == (4, 8, 8)
    for m, r in zip(maps, records):
        np.testing.assert_allclose(m, to_latent_grid(reward_map(r["vlm_rewards"], 32, 32), 8), atol=1e-6)
    stats = summary["reward_stats"]
    assert stats["reward_mean"] == pytest.approx(float(np.mean([reward_map(r["vlm_rewards"], 32, 32) for r in records])),
                                                   rel=1e-5)
    assert stats["num_regions"] == 8 and stats["frac_regions_below_neutral"] == 0.0
    assert stats["global_score_mean"] == pytest.approx(0.2)
    assert summary["global_score_by_category"] == pytest.approx({"shape": 0.4, "spatial": 0.0})
    # the swapped spatial candidate's map is scaled to zero everywhere by its global factor (-1 + 1) / 2
    assert maps[1].max() == 0.0 and maps[0].max() == pytest.approx(1.0)
    assert summary["train"]["steps"] == 2 and summary["judge"] == "oracle"

    trained = load_pipeline(tmp_path / "ckpt")
    assert trained.latent_grid == (8, 8)
    on_disk = json.loads((round_dir / "summary.json").read_text())
    assert on_disk["paths"]["checkpoint"] == str(tmp_path / "ckpt")


@pytest.mark.slow
def test_the_default_round_is_judged_by_the_models_own_understanding(bagel_release, tmp_path, monkeypatch):
    cfg, init = tiny_checkpoint(bagel_release, tmp_path / "init")
    srum = SrumConfig(candidates=1, steps=1, micro_batch=2, warmup_steps=0)
    assert srum.judge == "self"
    rows = prompt_rows()
    monkeypatch.setattr(BagelPipeline, "generate", lambda self, examples, **kw: [render_array(r["target"]) for r in rows])
    summary = run_round(init, rows, srum, SamplingConfig(steps=1, cfg_text=1.0, cfg_image=1.0, batch_size=4),
                        tmp_path / "srum", 1, ckpt_dir=tmp_path / "ckpt", model_cfg=cfg)
    assert summary["judge"] == "self"
    records = read_rewards(tmp_path / "srum" / "round_1" / "rewards.jsonl")
    regions = [e for r in records for e in r["vlm_rewards"][1:]]
    assert len(regions) == 4 and all("P(yes)" in e["reason"] for e in regions)
    assert "mean P(yes)" in records[0]["vlm_rewards"][0]["reason"]
    # the untrained expert's answers are its own, in range, and the global one of a stated layout is 2 P(yes) - 1
    assert all(-1.0 <= e["score"] <= 1.0 for r in records for e in r["vlm_rewards"])
