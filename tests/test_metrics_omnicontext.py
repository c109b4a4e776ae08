import json
import math

import numpy as np
import pytest

from evaluation.omnicontext import (
    CATEGORIES,
    aggregate_omnicontext,
    canonical_category,
    case_overall,
    format_omnicontext_table,
    group_summary,
)
from evaluation.paper_results import SCONE_TABLE2
from evaluation.results import ResultsLayoutError


def line(key, task_type, pf, sc):
    return {"key": key, "task_type": task_type, "PF_score": pf, "SC_score": sc}


def write_group(root, model, group, lines):
    for l in lines:
        path = root / model / f"score_try{group}" / l["task_type"] / "score.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(l) + "\n")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("single_character", "single_character"),
        ("SINGLE_character", "single_character"),
        ("MULTIPLE_character_object", "multi_character_object"),
        ("multiple_char+obj", "multi_character_object"),
        ("Scene_Object", "scene_object"),
        ("scene object_character", "scene_character_object"),
    ],
)
def test_category_spellings_map_to_the_released_names(name, expected):
    assert canonical_category(name) == expected


def test_unknown_category_names_the_known_ones():
    with pytest.raises(ResultsLayoutError, match="single_character"):
        canonical_category("composition_single")
    with pytest.raises(ResultsLayoutError):
        canonical_category("single_character_object")  # SINGLE has no char + obj column


def test_case_overall_is_the_geometric_mean():
    assert case_overall(4.0, 9.0) == pytest.approx(6.0)
    assert case_overall(0.0, 10.0) == 0.0


def test_aggregate_hand_computed(tmp_path):
    # group 1: single_character cases (PF, SC) = (4, 9) and (10, 10) -> overall 6 and 10
    #          scene_object case (1, 4) -> overall 2
    write_group(tmp_path, "m", 1, [
        line("a", "SINGLE_character", 4, 9), line("b", "single_character", 10, 10), line("c", "scene_object", 1, 4),
    ])
    # group 2: single_character (9, 9), (9, 1) -> 9, 3; scene_object (4, 4) -> 4
    write_group(tmp_path, "m", 2, [
        line("a", "single_character", 9, 9), line("b", "single_character", 9, 1), line("c", "SCENE_object", 4, 4),
    ])
    s = aggregate_omnicontext(tmp_path, "m")
    assert s["groups"] == 2
    sc = s["per_category"]["single_character"]
    # group means: g1 PF 7, SC 9.5, overall 8; g2 PF 9, SC 5, overall 6 -> mean over groups
    assert sc["PF"] == pytest.approx(8.0)
    assert sc["SC"] == pytest.approx(7.25)
    assert sc["overall"] == pytest.approx(7.0)
    assert sc["n_cases"] == 2  # the two folder spellings of group 1 merged
    so = s["per_category"]["scene_object"]
    assert so["overall"] == pytest.approx(3.0)
    # average = mean over categories per group (g1: (8 + 2)/2 = 5, g2: (6 + 4)/2 = 5), then over groups
    assert s["average"]["overall"] == pytest.approx(5.0)
    assert s["std"]["overall"] == pytest.approx(0.0)
    assert s["per_category_std"]["single_character"]["overall"] == pytest.approx(1.0)
    assert s["missing_categories"] == [c for c in CATEGORIES if c not in ("single_character", "scene_object")]
    assert s["average"]["overall"] == pytest.approx(5.0)
    assert s["per_category"]["scene_object"]["PF"] == pytest.approx(2.5)


def test_overall_is_the_mean_of_case_geometric_means_not_of_averages():
    s = group_summary({"single_object": [line("a", "single_object", 10, 0), line("b", "single_object", 0, 10)]})
    f = s["per_category"]["single_object"]
    assert (f["PF"], f["SC"]) == (5.0, 5.0)
    assert f["overall"] == 0.0  # sqrt(mean PF * mean SC) would say 5


def test_paper_average_is_the_mean_of_the_eight_categories():
    # our reading of Table 2 (Average = plain mean of the category columns) reproduces every complete row
    complete = {n: v for n, v in SCONE_TABLE2.items() if None not in v}
    assert len(complete) == 10
    for name, vals in complete.items():
        # each published figure is rounded to 0.01: the mean of eight may be off by 0.005, the average by 0.005
        assert np.mean(vals[:8]) == pytest.approx(vals[8], abs=0.01), name


def test_bad_scores_and_empty_trees_fail_clearly(tmp_path):
    write_group(tmp_path, "m", 1, [line("a", "single_object", 11, 5)])
    with pytest.raises(ResultsLayoutError, match="0-10"):
        aggregate_omnicontext(tmp_path, "m")
    with pytest.raises(ResultsLayoutError, match="score_try"):
        aggregate_omnicontext(tmp_path, "other")
    bad = tmp_path / "n" / "score_try1" / "multi_object" / "score.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"key": "x", "PF_score": 5}) + "\n")
    with pytest.raises(ResultsLayoutError, match="SC_score"):
        aggregate_omnicontext(tmp_path, "n")


def test_table_has_the_paper_layout(tmp_path):
    lines = [line(f"k{i}", c, 9, 4) for i, c in enumerate(CATEGORIES)]  # overall 6 everywhere
    write_group(tmp_path, "mine", 1, lines)
    s = aggregate_omnicontext(tmp_path, "mine")
    table = format_omnicontext_table(s, context=True)
    rows = table.splitlines()
    assert rows[0] == (
        "| Method | SINGLE Character | SINGLE Object | MULTIPLE Character | MULTIPLE Object | MULTIPLE Char. + Obj. | "
        "SCENE Character | SCENE Object | SCENE Char. + Obj. | Average |"
    )
    assert "| Scone (paper) | 8.34 | 8.52 | 8.24 | 8.14 | 8.30 | 7.06 | 7.88 | 7.63 | 8.01 |" in rows
    assert "| FLUX.1 Kontext [dev] (paper) | 8.07 | 7.97 | - | - | - | - | - | - | - |" in rows
    assert "| mine | " + " | ".join(["6.00"] * 9) + " |" in rows
    assert "| scene_character_object | 9.00 | 4.00 | 6.00 | 1 |" in rows
    assert "| Average | 9.00 | 4.00 | 6.00 | |" in rows
    pf_table = format_omnicontext_table([("a", s), ("b", s)], figure="PF", details=False)
    assert pf_table.splitlines()[2] == "| a | " + " | ".join(["9.00"] * 9) + " |"
    assert len(pf_table.splitlines()) == 4


def test_missing_category_shows_a_dash_and_std(tmp_path):
    write_group(tmp_path, "m", 1, [line("a", "single_character", 4, 9)])
    write_group(tmp_path, "m", 2, [line("a", "single_character", 9, 9)])
    s = aggregate_omnicontext(tmp_path, "m")
    row = format_omnicontext_table(s, with_std=True, details=False).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "7.50±1.50"
    assert cells[2:9] == ["-"] * 7
    assert cells[9] == "7.50±1.50"
    assert math.isclose(s["average"]["overall"], 7.5)
