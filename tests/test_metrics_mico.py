import json
import math

import pytest

from evaluation.mico import (
    canonical_category,
    case_score,
    format_mico_table,
    identity_score,
    perceptual_quality,
    presence_score,
    read_cases,
    semantic_consistency,
    summarize,
    visibility_weight,
    weighted_ref_viescore,
)


@pytest.mark.parametrize(
    "similarity, expected",
    [
        (1.0, 1.0),
        (0.9, 1.0),
        (0.45, 1.0),
        (0.4499, 0.7),
        (0.30, 0.7),
        (0.2999, 0.5),
        (0.15, 0.5),
        (0.1499, 0.2),
        (0.05, 0.2),
        (0.0499, 0.0),
        (0.0, 0.0),
        (-0.4, 0.0),
    ],
)
def test_identity_bands_and_their_edges(similarity, expected):
    assert identity_score(similarity) == expected


def test_identity_best_match_and_no_face():
    assert identity_score([0.1, 0.5, 0.2]) == 1.0  # the best-matching face in the output counts
    assert identity_score([]) == 0.0
    assert identity_score(None) == 0.0
    with pytest.raises(ValueError, match="cosine"):
        identity_score(1.5)


def test_presence_is_binary():
    assert presence_score(1) == 1.0 and presence_score(False) == 0.0
    assert presence_score("Yes") == 1.0 and presence_score("no") == 0.0
    with pytest.raises(ValueError, match="binary"):
        presence_score(0.5)
    with pytest.raises(ValueError, match="yes/no"):
        presence_score("maybe")


def test_visibility_weight_mixes_binary_and_graded_sources():
    sources = [{"present": 1}, {"present": 0}, {"identity_similarity": 0.35}, {"identity_similarity": 0.2}]
    assert visibility_weight(sources) == pytest.approx((1 + 0 + 0.7 + 0.5) / 4)
    with pytest.raises(ValueError, match="exactly one"):
        visibility_weight([{"present": 1, "identity_similarity": 0.9}])
    with pytest.raises(ValueError, match="exactly one"):
        visibility_weight([{}])
    with pytest.raises(ValueError, match="at least one source"):
        visibility_weight([])


def test_case_score_hand_computed():
    # W = (1 + 0.7) / 2 = 0.85; SC = sqrt(9 * 4) = 6; PQ = sqrt(8 * 2) = 4; score = 0.85 * 6 * 4 = 20.4
    out = case_score([{"present": "yes"}, {"identity_similarity": 0.30}], pf=4, sr=9, naturalness=8, artifacts=2)
    assert out["W"] == pytest.approx(0.85)
    assert out["SC"] == pytest.approx(6.0)
    assert out["PQ"] == pytest.approx(4.0)
    assert out["score"] == pytest.approx(20.4)
    assert out["ref_viescore"] == pytest.approx(24.0)


def test_score_scale_is_0_to_100():
    best = case_score([{"present": 1}], pf=10, sr=10, naturalness=10, artifacts=10)
    assert best["score"] == pytest.approx(100.0)
    assert case_score([{"present": 0}], pf=10, sr=10, naturalness=10, artifacts=10)["score"] == 0.0
    assert semantic_consistency(0, 10) == 0.0  # no resemblance at all: nothing follows through
    assert perceptual_quality(10, 2.5) == pytest.approx(5.0)
    assert weighted_ref_viescore(0.5, 10, 10) == 50.0
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        semantic_consistency(11, 5)
    with pytest.raises(ValueError, match="W must"):
        weighted_ref_viescore(1.2, 5, 5)


@pytest.mark.parametrize(
    "name, expected",
    [("Object-Centric", "object"), ("Human-Centric", "person"), ("Person", "person"),
     ("Human-Object Interaction", "hoi"), ("HOI", "hoi"), ("De&Re", "de_re"), ("de_re", "de_re")],
)
def test_category_names(name, expected):
    assert canonical_category(name) == expected


def test_unknown_category():
    with pytest.raises(ValueError, match="Object, Person, HOI, De&Re"):
        canonical_category("animals")


def judged(category, w_present, pf, sr, nat, art, key="k"):
    return {"key": key, "category": category, "sources": [{"present": p} for p in w_present],
            "PF": pf, "SR": sr, "naturalness": nat, "artifacts": art}


def test_summary_per_category_and_overall(tmp_path):
    rows = [
        judged("Object", [1, 1], 10, 10, 10, 10, "a"),  # 100
        judged("Object", [1, 0], 10, 10, 10, 10, "b"),  # 50
        judged("HOI", [1], 4, 9, 8, 2, "c"),  # 6 * 4 = 24
        judged("De&Re", [0], 10, 10, 10, 10, "d"),  # 0
    ]
    path = tmp_path / "mico.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(read_cases(path))
    assert s["per_category"]["object"]["score"] == pytest.approx(75.0)
    assert s["per_category"]["object"]["W"] == pytest.approx(0.75)
    assert s["per_category"]["object"]["n_cases"] == 2
    assert s["per_category"]["hoi"]["SC"] == pytest.approx(6.0)
    assert s["per_category"]["de_re"]["score"] == 0.0
    assert s["overall"]["score"] == pytest.approx((100 + 50 + 24 + 0) / 4)
    assert s["category_mean"]["score"] == pytest.approx((75 + 24 + 0) / 3)
    assert s["missing_categories"] == ["person"]
    # already scored rows pass through unchanged
    again = summarize([{"category": "person", "score": 10.0, "W": 1.0, "SC": 5.0, "PQ": 2.0}])
    assert again["overall"]["ref_viescore"] == pytest.approx(10.0)


def test_missing_fields_and_files_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        summarize([{"key": "x", "category": "hoi", "PF": 1}])
    with pytest.raises(FileNotFoundError, match="no MICo score file"):
        read_cases(tmp_path / "nope.jsonl")


def test_table_layout():
    s = summarize([judged("Object", [1], 10, 10, 10, 10), judged("Person", [1], 9, 4, 4, 4)])
    table = format_mico_table([("mine", s)], context=True)
    rows = table.splitlines()
    assert rows[0] == "| Model | Overall | Object | Person | HOI | De&Re |"
    assert "| BAGEL (paper) | 19.3 | 24.4 | 22.4 | 12.9 | 34.2 |" in rows
    assert rows[-1] == "| mine | 62.0 | 100.0 | 24.0 | - | - |"  # overall (100 + 24) / 2
    assert not math.isnan(s["category_mean"]["score"])


def test_w_ref_viescore_graded_faces_zero_weights_and_missing_faces_hand_computed(tmp_path):
    """A results tree another tool wrote (one file per task group), aggregated from the judges' answers."""
    from evaluation.mico import aggregate_mico

    a = {"key": "a", "category": "Human-Centric", "PF": 4, "SR": 9, "naturalness": 9, "artifacts": 4,
         # faces in every band: 1.0, 0.7, 0.5, 0.2, 0.0; one object present -> W = 3.4 / 6
         "sources": [{"identity_similarity": s} for s in (0.5, 0.35, 0.2, 0.1, 0.01)] + [{"present": "yes"}]}
    # zero weight: no face found (None) and the object absent -> W = 0, so 0 despite perfect SC and PQ
    b = {"key": "b", "category": "HOI", "PF": 10, "SR": 10, "naturalness": 10, "artifacts": 10,
         "sources": [{"identity_similarity": None}, {"present": 0}]}
    c = {**b, "key": "c", "sources": [{"identity_similarity": [0.02, 0.3]}]}  # best face 0.3 -> 0.7
    (tmp_path / "run" / "person").mkdir(parents=True)
    (tmp_path / "run" / "hoi").mkdir()
    (tmp_path / "run" / "person" / "judged.jsonl").write_text(json.dumps(a) + "\n")
    (tmp_path / "run" / "hoi" / "judged.jsonl").write_text(json.dumps(b) + "\n" + json.dumps(c) + "\n")
    s = aggregate_mico(tmp_path / "run")
    assert s["model"] == "run"
    assert s["per_category"]["person"]["W"] == pytest.approx(3.4 / 6)
    assert s["per_category"]["person"]["score"] == pytest.approx(3.4 / 6 * 6 * 6)  # SC 6, PQ 6: 20.4
    assert s["per_category"]["hoi"]["score"] == pytest.approx((0 + 70) / 2)
    assert s["per_category"]["hoi"]["ref_viescore"] == pytest.approx(100.0)  # without W both cases are perfect
    assert s["overall"]["score"] == pytest.approx((20.4 + 0 + 70) / 3)
    assert s["category_mean"]["score"] == pytest.approx((20.4 + 35) / 2)
    assert s["missing_categories"] == ["object", "de_re"]
    # stored figures that disagree with the judges' answers are recomputed from the answers
    (tmp_path / "run" / "hoi" / "judged.jsonl").write_text(json.dumps({**b, "score": 99.0, "W": 1, "SC": 10, "PQ": 10}) + "\n")
    assert aggregate_mico(tmp_path / "run")["per_category"]["hoi"]["score"] == 0.0
    # a case missing a judge's score is an error naming it, not a silent 0
    (tmp_path / "run" / "hoi" / "judged.jsonl").write_text(json.dumps({k: v for k, v in b.items() if k != "SR"}) + "\n")
    with pytest.raises(ValueError, match=r"MICo case b lacks \['SR'\]"):
        aggregate_mico(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no MICo-Bench results"):
        aggregate_mico(tmp_path / "empty")
