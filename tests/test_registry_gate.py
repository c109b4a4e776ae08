"""The promotion rule, without MLflow: thresholds on the SconeEval averages and no regression vs the champion."""
import pytest

from registry import (
    SCONEEVAL_COM, SCONEEVAL_DIS, SCONEEVAL_OVERALL, TABLE3_COLUMNS, sconeeval_metric, sconeeval_metrics,
)
from registry.config import GateConfig
from registry.gate import decide


def scores(com, dis):
    return {SCONEEVAL_COM: com, SCONEEVAL_DIS: dis, SCONEEVAL_OVERALL: (com + dis) / 2}


def test_first_candidate_passing_thresholds_is_promoted():
    d = decide(scores(4.0, 6.0), None, GateConfig(min_overall=4.5, min_com=3.0, min_dis=5.0))
    assert d.promote and d.decision == "promoted"
    assert all(r.startswith("pass") for r in d.reasons)
    assert "pass: no champion yet" in d.reasons


@pytest.mark.parametrize("threshold, value", [("min_overall", 5.0), ("min_com", 4.0), ("min_dis", 6.0)])
def test_each_threshold_rejects_and_is_named(threshold, value):
    # 4.0 / 6.0 / overall 5.0: each threshold set just above the candidate's own value
    gate = GateConfig(**{threshold: value + 0.01})
    d = decide(scores(4.0, 6.0), None, gate)
    assert not d.promote
    fails = [r for r in d.reasons if r.startswith("fail")]
    assert len(fails) == 1 and threshold in fails[0]


def test_threshold_equal_to_score_passes():
    d = decide(scores(4.0, 6.0), None, GateConfig(min_overall=5.0, min_com=4.0, min_dis=6.0))
    assert d.promote


def test_regression_against_champion_rejects_within_tolerance_passes():
    champion = scores(6.0, 8.0)  # overall 7.0
    candidate = scores(6.0, 7.6)  # overall 6.8: a 0.2 drop
    strict = decide(candidate, champion, GateConfig(min_overall=0.5, max_regression=0.0))
    assert not strict.promote
    assert any(r.startswith("fail: regression") and "6.8000" in r and "7.0000" in r for r in strict.reasons)
    tolerant = decide(candidate, champion, GateConfig(min_overall=0.5, max_regression=0.25))
    assert tolerant.promote


def test_equal_overall_is_not_a_regression_despite_float_noise():
    champion = {SCONEEVAL_OVERALL: 6.97, SCONEEVAL_COM: 6.74, SCONEEVAL_DIS: 7.20}
    candidate = {SCONEEVAL_OVERALL: (6.74 + 7.20) / 2, SCONEEVAL_COM: 6.74, SCONEEVAL_DIS: 7.20}
    assert decide(candidate, champion, GateConfig()).promote


def test_missing_metric_rejects_with_reason():
    d = decide({SCONEEVAL_OVERALL: 7.0}, None, GateConfig())
    assert not d.promote
    assert any("sconeeval.com missing" in r for r in d.reasons)
    assert any("sconeeval.dis missing" in r for r in d.reasons)


def test_champion_without_overall_does_not_block():
    assert decide(scores(5.0, 5.0), {"other": 1.0}, GateConfig()).promote


def test_metric_names_follow_table3_layout():
    assert sconeeval_metric("distinction_cross", "dis") == "sconeeval.distinction_cross.dis"
    keys = [k for _, k in TABLE3_COLUMNS]
    assert len(keys) == 13 and len(set(keys)) == 13
    assert keys[-3:] == [SCONEEVAL_COM, SCONEEVAL_DIS, SCONEEVAL_OVERALL]
    # composition tasks report COM only (Table 3): two columns, then COM/DIS pairs for the four others
    assert keys[:2] == ["sconeeval.composition_single.com", "sconeeval.composition_multi.com"]
    with pytest.raises(ValueError, match="unknown SconeEval task type"):
        sconeeval_metric("composition", "com")


def test_evaluation_summary_maps_to_registry_names():
    summary = {  # the shape evaluation.sconeeval.summarize_groups returns (NaN/null where a task type is absent)
        "average": {"COM": 6.0, "DIS": 8.0, "Overall": 7.0},
        "std": {"COM": 0.5, "DIS": float("nan"), "Overall": None},
        "per_task": {"composition_single": {"PF": 7.0, "SC": 5.0, "COM": 5.9, "n_cases": 4},
                     "distinction_cross": {"COM": 6.1, "DIS": 8.0, "DIS_acc": 0.75, "n_cases": 4}},
    }
    m = sconeeval_metrics(summary)
    assert m[SCONEEVAL_OVERALL] == 7.0 and m[SCONEEVAL_COM] == 6.0 and m[SCONEEVAL_DIS] == 8.0
    assert m["sconeeval.com_std"] == 0.5 and "sconeeval.dis_std" not in m and "sconeeval.overall_std" not in m
    assert m[sconeeval_metric("composition_single", "com")] == 5.9
    assert m[sconeeval_metric("distinction_cross", "dis")] == 8.0 and m["sconeeval.distinction_cross.dis_acc"] == 0.75
    assert not any("n_cases" in k for k in m) and len(m) == 4 + 3 + 3
    assert decide(m, None, GateConfig(min_overall=7.0)).promote
    with pytest.raises(ValueError, match="not a SconeEval summary"):
        sconeeval_metrics({"Overall": 7.0})
