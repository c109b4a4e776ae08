import json
import types
from pathlib import Path

import numpy as np
import pytest

from benchmarks.srum_ablation import VARIANTS, default_variants, judge_agreement, variant_config, variant_map
from data.formats.srum_rewards import GLOBAL_OBJECT, read_rewards
from model.config import SrumConfig

# 32 x 32 image, 8 x 8 latent grid: global 0.5 (factor 0.75), one region over the left half scored 1.0
RECORD = [
    {"object": GLOBAL_OBJECT, "bbox": [0, 0, 32, 32], "score": 0.5},
    {"object": "red circle", "bbox": [0, 0, 16, 32], "score": 1.0},
]


def halves(left: float, right: float) -> np.ndarray:
    m = np.full((8, 8), right, dtype=np.float32)
    m[:, :4] = left
    return m


@pytest.mark.parametrize("variant, expected", [
    ("srum", halves(0.75, 0.375)),  # region lifts its box to 1, then x (0.5 + 1) / 2
    ("srum_self_judge", halves(0.75, 0.375)),  # same map, other judge's records
    ("srum_oracle_judge", halves(0.75, 0.375)),
    ("no_constraint", halves(0.75, 0.375)),
    ("no_global", halves(0.5, 0.25)),  # the global judgment replaced by neutral 0: factor 0.5
    ("sample_level", np.full((8, 8), 0.5625)),  # the mean of the full map everywhere
    ("binarised", halves(1.0, 0.0)),  # >= 0.5 -> 1
    ("sft", np.ones((8, 8))),
    ("reference_only", np.zeros((8, 8))),
])
def test_variant_maps_match_hand_computed(variant, expected):
    got = variant_map(variant, RECORD, 32, 32, 8)
    assert got.shape == (8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_variant_map_names_the_choices_on_a_typo():
    with pytest.raises(ValueError, match="sample_level"):
        variant_map("sample-level", RECORD, 32, 32, 8)


def test_only_no_constraint_drops_lambda_c_and_every_variant_takes_the_seed():
    base = SrumConfig(lambda_c=0.5, seed=0)
    for name in VARIANTS:
        cfg = variant_config(name, base, 7)
        assert cfg.seed == 7
        assert cfg.lambda_c == (0.0 if name == "no_constraint" else 0.5)
        assert cfg.steps == base.steps and cfg.lr == base.lr


def test_default_variants_leave_out_the_control_equal_to_the_configured_judge():
    assert "srum_oracle_judge" not in default_variants("oracle") and "srum_self_judge" in default_variants("oracle")
    assert "srum_self_judge" not in default_variants("self") and "srum_oracle_judge" in default_variants("self")
    assert {"srum_self_judge", "srum_oracle_judge"} <= set(default_variants("openai"))
    assert set(default_variants("self")) >= {"sft", "srum", "sample_level", "binarised", "no_constraint", "no_global"}


def test_judge_agreement_counts_signs_and_correlation():
    def rec(g, regions):
        return {"vlm_rewards": [{"score": g}] + [{"score": s} for s in regions]}

    a = [rec(0.5, [0.9, -0.6]), rec(-0.5, [0.2]), rec(1.0, [])]
    b = [rec(0.6, [0.8, 0.7]), rec(-0.4, [-0.3]), rec(0.9, [])]
    out = judge_agreement(a, b)
    assert out["global"]["n"] == 3 and out["global"]["sign_agreement"] == 1.0
    assert out["global"]["pearson"] == pytest.approx(np.corrcoef([0.5, -0.5, 1.0], [0.6, -0.4, 0.9])[0, 1], abs=1e-3)
    assert out["regions"]["n"] == 3 and out["regions"]["sign_agreement"] == pytest.approx(1 / 3, abs=1e-3)


def test_variant_maps_take_the_pipelines_rows_and_cols():
    # a BAGEL pipeline's latent grid is (rows, cols); a square int grid is the same map
    for variant in ("srum", "sample_level", "binarised", "sft", "reference_only"):
        np.testing.assert_array_equal(variant_map(variant, RECORD, 32, 32, (8, 8)),
                                      variant_map(variant, RECORD, 32, 32, 8))
    wide = variant_map("srum", RECORD, 32, 32, (4, 8))
    assert wide.shape == (4, 8)
    np.testing.assert_allclose(wide[:, :4], 0.75, atol=1e-6)  # the region's half, on the wider grid
    np.testing.assert_allclose(wide[:, 4:], 0.375, atol=1e-6)
    assert variant_map("sft", RECORD, 32, 32, (4, 8)).shape == (4, 8)


@pytest.mark.slow
def test_ablation_trains_every_variant_on_the_same_candidates(bagel_release, tmp_path):
    from data.catalog import SRUM
    from data.world import dataset_world
    from data.config import DataConfig
    from data.formats.srum_prompts import make_prompts, write_prompts
    from benchmarks.srum_ablation import run
    from evaluation.config import EvalConfig, SamplingConfig
    from flows.params import load_params
    from test_srum_round import tiny_checkpoint

    data = DataConfig(root=str(tmp_path / "data"))
    write_prompts(make_prompts(dataset_world(data, SRUM), 7), tmp_path / "data" / "srum_prompts" / "prompts.jsonl")
    cfg, _ = tiny_checkpoint(bagel_release, tmp_path / "artifacts" / "checkpoints" / "stage2_step2")
    params = types.SimpleNamespace(
        data=data, model=cfg, train=load_params(Path(__file__).parents[1] / "params.yaml").train,
        srum=SrumConfig(candidates=2, steps=2, micro_batch=2, warmup_steps=1, judge="oracle"),
        eval=EvalConfig(sampling=SamplingConfig(steps=2, cfg_text=1.0, cfg_image=1.0, batch_size=16)),
        pipeline=types.SimpleNamespace(artifacts=str(tmp_path / "artifacts")),
    )
    out = tmp_path / "artifacts" / "bench" / "srum-ablation.json"
    variants = ("sft", "srum", "no_constraint", "reference_only")
    result = run(params, out, seeds=(0, 1), variants=variants, eval_samples=1, heldout_per_category=1)

    assert json.loads(out.read_text()) == result
    assert list(result["variants"]) == list(variants) and result["prompts"] == {"train_prompts": 7, "heldout_prompts": 7}
    work = out.with_suffix("")
    for seed in (0, 1):
        records = read_rewards(work / f"seed{seed}" / "rewards_oracle.jsonl")
        assert len(records) == 7 * 2 and all(r["vlm_rewards"][0]["object"] == GLOBAL_OBJECT for r in records)
        assert len(read_rewards(work / f"seed{seed}" / "rewards_self.jsonl")) == 14
        summaries = {v: json.loads((work / f"seed{seed}" / v / "train_summary.json").read_text()) for v in variants}
        assert summaries["no_constraint"]["lambda_c"] == 0.0 and summaries["srum"]["lambda_c"] == 0.5
        assert summaries["reference_only"]["final_l_r"] == 0.0 < summaries["sft"]["final_l_r"]
    for name in variants:
        for prompt_set in ("train_prompts", "heldout_prompts"):
            s = result["variants"][name]["scores"][prompt_set]
            assert len(s["mean"]["runs"]) == 2 and 0.0 <= s["mean"]["mean"] <= 1.0
            assert set(s["per_category"]) == set(result["init"]["scores"][prompt_set]["per_category"])
            assert s["mean"]["std"] == pytest.approx(np.std(s["mean"]["runs"]), abs=1e-4)
    assert set(result["self_vs_oracle_judge"]) == {"0", "1"}
    assert "srum_minus_sft_train_prompts" in result
    table = result["table_heldout_prompts"]
    assert all(VARIANTS[v] in table for v in variants) and "init (no round)" in table
