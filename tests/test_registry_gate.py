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


# ---------------------------------------------------------------- MICo-Bench and MIGE-Bench rules (params: null = off)


def with_heldout(com, dis, mico=None, mige=None):
    from registry import MICO_OVERALL, MIGE_OVERALL

    out = scores(com, dis)
    out.update({k: v for k, v in ((MICO_OVERALL, mico), (MIGE_OVERALL, mige)) if v is not None})
    return out


def test_benchmark_rules_are_off_by_default_and_keep_todays_decisions():
    gate = GateConfig()
    assert gate.mico.min_score is None and gate.mige.max_regression is None
    # a candidate far worse on MICo and MIGE than the champion, equal on SconeEval: promoted as before
    d = decide(with_heldout(6.0, 8.0, mico=1.0, mige=0.5), with_heldout(6.0, 8.0, mico=60.0, mige=9.0), gate)
    assert d.promote and not any("mico" in r or "mige" in r for r in d.reasons)


def test_benchmark_threshold_rejects_and_names_itself():
    gate = GateConfig(mico={"min_score": 20.0}, mige={"min_score": 5.0})
    d = decide(with_heldout(6.0, 8.0, mico=19.0, mige=5.0), None, gate)
    assert not d.promote
    assert [r for r in d.reasons if r.startswith("fail")] == ["fail: mico.overall 19.0000 < min_score 20"]
    assert "pass: mige.overall 5.0000 >= min_score 5" in d.reasons
    missing = decide(scores(6.0, 8.0), None, gate)  # a candidate scored without them cannot pass a set threshold
    assert not missing.promote and any("mico.overall missing" in r for r in missing.reasons)


def test_benchmark_no_regression_rule_per_benchmark():
    gate = GateConfig(mige={"max_regression": 0.5})
    champion = with_heldout(6.0, 8.0, mico=50.0, mige=6.0)
    assert decide(with_heldout(6.0, 8.0, mico=10.0, mige=5.5), champion, gate).promote  # within tolerance; MICo off
    d = decide(with_heldout(6.0, 8.0, mige=5.4), champion, gate)
    assert not d.promote and any(r.startswith("fail: regression: mige.overall 5.4000 vs champion 6.0000") for r in d.reasons)
    assert decide(with_heldout(6.0, 8.0, mige=1.0), scores(6.0, 8.0), gate).promote  # the champion has no MIGE score
    assert decide(with_heldout(6.0, 8.0, mige=1.0), None, gate).promote
    with pytest.raises(ValueError):
        GateConfig(mico={"max_regression": -1.0})


def test_mico_and_mige_summaries_map_to_registry_names():
    from registry import MICO_COLUMNS, MICO_OVERALL, MIGE_COLUMNS, MIGE_OVERALL, mico_metrics, mige_metrics

    mico = {"overall": {"score": 24.0, "W": 0.5, "SC": 6.0, "PQ": 8.0, "ref_viescore": 48.0, "n_cases": 8},
            "per_category": {"hoi": {"score": 30.0, "W": 0.5, "SC": 6.0, "PQ": 10.0, "ref_viescore": 60.0, "n_cases": 3}}}
    m = mico_metrics(mico)
    assert m[MICO_OVERALL] == 24.0 and m["mico.w"] == 0.5 and m["mico.hoi.score"] == 30.0 and len(m) == 5 + 5
    mige = {"overall": {"subject_fidelity": 4.0, "instruction_following": 2.0, "preservation": 9.0, "score": 5.0,
                        "L1": 0.1, "n_cases": 8},
            "per_edit": {"addition": {"subject_fidelity": 4.0, "score": 5.0, "n_cases": 4}}}
    g = mige_metrics(mige)
    assert g[MIGE_OVERALL] == 5.0 and g["mige.preservation"] == 9.0 and g["mige.l1"] == 0.1
    assert g["mige.addition.subject_fidelity"] == 4.0 and not any("n_cases" in k for k in g)
    # the report's columns name metrics these produce
    assert {k for _, k in MICO_COLUMNS} <= set(m) | {f"mico.{c}.score" for c in ("object", "person", "de_re")}
    assert {k for _, k in MIGE_COLUMNS} <= set(g) | {f"mige.{e}.{f}" for e in ("addition", "replacement")
                                                      for f in ("subject_fidelity", "instruction_following", "preservation")}
    with pytest.raises(ValueError, match="not a MICo-Bench summary"):
        mico_metrics({"average": {}})
    with pytest.raises(ValueError, match="not a MIGE-Bench summary"):
        mige_metrics(mico)
