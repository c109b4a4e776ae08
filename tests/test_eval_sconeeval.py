"""SconeEval formulas, results layout and Table 3, against hand-computed numbers."""
import json
import math
from types import SimpleNamespace

import pytest

from evaluation.aggregate import aggregate_command
from evaluation.paper_results import SCONE_TABLE3
from evaluation.results import ResultsLayoutError, com_score, write_scores
from evaluation.sconeeval import (
    aggregate,
    distinction_metrics,
    format_table3,
    score_line,
    table3_row,
)


def test_com_is_geometric_mean():
    assert com_score(9, 4) == 6.0
    assert com_score(0, 10) == 0.0
    with pytest.raises(ValueError):
        com_score(-1, 4)


@pytest.mark.parametrize(
    "labels, preds, expected",
    [
        # tp=1 fp=1 fn=1 tn=1
        ([[1, 0], [0, 1]], [[1, 1], [0, 0]], dict(DIS_acc=5.0, DIS_prec=5.0, DIS_recall=5.0, DIS_f1=5.0, DIS=5.0)),
        # no positive prediction: precision, recall, F1 are 0; accuracy 2/3
        ([[1, 0, 0]], [[0, 0, 0]], dict(DIS_acc=20 / 3, DIS_prec=0.0, DIS_recall=0.0, DIS_f1=0.0, DIS=10 / 3)),
        # all right
        ([[1, 0, 0], []], [[1, 0, 0], []], dict(DIS_acc=10.0, DIS_prec=10.0, DIS_recall=10.0, DIS_f1=10.0, DIS=10.0)),
        # tp=1 fp=1 fn=0 tn=2: F1 is the harmonic mean 2PR/(P+R) = 2/3, not (P+R)/2 = 3/4
        ([[1, 0, 0, 0]], [[1, 1, 0, 0]], dict(DIS_acc=7.5, DIS_prec=5.0, DIS_recall=10.0, DIS_f1=20 / 3, DIS=(7.5 + 20 / 3) / 2)),
        # no positive label, one false alarm: precision 0 (tp=0), recall undefined -> 0
        ([[0, 0]], [[1, 0]], dict(DIS_acc=5.0, DIS_prec=0.0, DIS_recall=0.0, DIS_f1=0.0, DIS=2.5)),
    ],
)
def test_distinction_metrics_hand_computed(labels, preds, expected):
    got = distinction_metrics(labels, preds)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v), k


def test_distinction_metrics_rejects_shape_mismatch_and_non_binary():
    with pytest.raises(ValueError, match="shape of subject_label"):
        distinction_metrics([[1, 0]], [[1]])
    with pytest.raises(ValueError, match="0/1"):
        distinction_metrics([[1, 0]], [[2, 0]])


def _case(key, task_type, labels=((1, 0),)):
    return SimpleNamespace(
        key=key, task_type=task_type, case_type="2O", instruction="put it there", subject_label=[list(l) for l in labels]
    )


def test_score_line_fields():
    line = score_line(_case("a", "distinction_cross"), 9, 4, ("pf why", "sc why"), [[1, 1]], [["r1", "r2"]], round=1)
    assert line["PF_score"] == 9 and line["SC_score"] == 4 and line["COM"] == 6
    assert line["PF_score_reason"] == "pf why" and line["SC_score_reason"] == "sc why"
    assert line["DIS_acc"] == 5 and line["DIS_prec"] == 5 and line["DIS_recall"] == 10
    assert line["DIS_f1"] == pytest.approx(20 / 3) and line["DIS_pred"] == [[1, 1]] and line["round"] == 1
    comp = score_line(_case("b", "composition_single"), 4, 1, "both")
    assert "DIS_acc" not in comp and comp["PF_score_reason"] == comp["SC_score_reason"] == "both"
    with pytest.raises(ValueError, match="presence"):
        score_line(_case("c", "distinction_intra"), 1, 1)


def _dis(acc, f1):
    return {"DIS_acc": acc, "DIS_prec": 0.0, "DIS_recall": 0.0, "DIS_f1": f1}


def _write_two_groups(root, model="m"):
    """Group 1: single COM (6 + 2)/2 = 4, cross COM 10 DIS 5 -> COM 7, DIS 5, Overall 6.
    Group 2: single COM (1 + 3)/2 = 2, cross COM 6 DIS 10 -> COM 4, DIS 10, Overall 7."""
    g1 = [
        {"key": "s1", "task_type": "composition_single", "PF_score": 9, "SC_score": 4},
        {"key": "s2", "task_type": "composition_single", "PF_score": 4, "SC_score": 1},
        {"key": "d1", "task_type": "distinction_cross", "PF_score": 10, "SC_score": 10, **_dis(5, 5)},
    ]
    g2 = [
        {"key": "s1", "task_type": "composition_single", "PF_score": 1, "SC_score": 1},
        {"key": "s2", "task_type": "composition_single", "PF_score": 9, "SC_score": 1},
        {"key": "d1", "task_type": "distinction_cross", "PF_score": 4, "SC_score": 9, **_dis(10, 10)},
    ]
    write_scores(root, model, 1, g1)
    write_scores(root, model, 2, g2)


def test_layout_round_trip_means_and_stds(tmp_path):
    _write_two_groups(tmp_path)
    assert (tmp_path / "m" / "score_try2" / "distinction_cross" / "score.jsonl").is_file()
    s = aggregate(tmp_path, "m")
    assert s["groups"] == 2
    # PF over task types: group 1 (6.5 + 10) / 2 = 8.25, group 2 (5 + 4) / 2 = 4.5; SC: (2.5 + 10) / 2, (1 + 9) / 2
    assert s["average"] == pytest.approx({"COM": 5.5, "DIS": 7.5, "Overall": 6.5, "PF": 6.375, "SC": 5.625})
    assert s["std"] == pytest.approx({"COM": 1.5, "DIS": 2.5, "Overall": 0.5, "PF": 1.875, "SC": 0.625})
    single = s["per_task"]["composition_single"]
    assert single["COM"] == pytest.approx(3.0) and single["PF"] == pytest.approx(5.75) and single["n_cases"] == 2
    assert s["per_task_std"]["composition_single"]["COM"] == pytest.approx(1.0)
    assert s["per_task"]["distinction_cross"]["DIS"] == pytest.approx(7.5)
    assert s["missing_task_types"] == [
        "composition_multi", "distinction_intra", "distinction_composition_cross", "distinction_composition_intra"
    ]


def test_com_averages_case_com_not_sqrt_of_means(tmp_path):
    # per case sqrt(9*1)=3 and sqrt(1*9)=3 -> 3; sqrt(mean PF * mean SC) would be 5
    write_scores(tmp_path, "m", 1, [
        {"key": "a", "task_type": "composition_multi", "PF_score": 9, "SC_score": 1},
        {"key": "b", "task_type": "composition_multi", "PF_score": 1, "SC_score": 9},
    ])
    assert aggregate(tmp_path, "m")["per_task"]["composition_multi"]["COM"] == pytest.approx(3.0)


def test_reads_scone_tool_tree_and_scorings_lists(tmp_path):
    # the released Scone tool: score_try1..3, its own distinction folder names, extra fields, combined file
    for k, (pf, acc) in enumerate([(4, 10), (9, 0), (1, 5)], start=1):
        d = tmp_path / "Scone" / f"score_try{k}"
        (d / "distinction_single_cross").mkdir(parents=True)
        (d / "distinction_single_cross" / "score.jsonl").write_text(
            json.dumps({"key": "x", "PF_score": pf, "SC_score": pf, "DIS_pred": [[1]], **_dis(acc, acc)}) + "\n"
        )
        (d / "combined_score.jsonl").write_text("not read\n")
    s = aggregate(tmp_path, "Scone")
    assert s["groups"] == 3 and list(s["per_task"]) == ["distinction_cross"]
    assert s["per_task"]["distinction_cross"]["COM"] == pytest.approx((4 + 9 + 1) / 3)
    assert s["average"]["DIS"] == pytest.approx(5.0)
    # one folder whose lines hold two scorings -> two groups
    line = {"key": "y", "task_type": "composition_single", "scorings": [
        {"PF_score": 10, "SC_score": 10}, {"PF_score": 0, "SC_score": 4}]}
    write_scores(tmp_path, "two", 1, [line])
    s2 = aggregate(tmp_path, "two")
    assert s2["groups"] == 2 and s2["average"]["COM"] == pytest.approx(5.0) and s2["std"]["COM"] == pytest.approx(5.0)


def test_bad_trees_give_readable_errors(tmp_path):
    with pytest.raises(ResultsLayoutError, match="no score_try"):
        aggregate(tmp_path, "nothing")
    write_scores(tmp_path, "m", 1, [{"key": "d", "task_type": "distinction_intra", "PF_score": 1, "SC_score": 1}])
    with pytest.raises(ResultsLayoutError, match="DIS_acc"):
        aggregate(tmp_path, "m")


def _full_summary(tmp_path):
    lines = []
    for i, t in enumerate(["composition_single", "composition_multi", "distinction_cross", "distinction_intra",
                           "distinction_composition_cross", "distinction_composition_intra"]):
        line = {"key": t, "task_type": t, "PF_score": i + 1, "SC_score": i + 1}
        if "distinction" in t:
            line.update(_dis(2 * i, 0))  # DIS = i
        lines.append(line)
    write_scores(tmp_path, "tiny", 1, lines)
    return aggregate(tmp_path, "tiny")


def test_table3_layout(tmp_path):
    s = _full_summary(tmp_path)
    # COM per task = i + 1; DIS = i on the distinction types (i = 2..5)
    assert table3_row(s) == pytest.approx((1, 2, 3, 2, 4, 3, 5, 4, 6, 5, 3.5, 3.5, 3.5))
    md = format_table3(s)
    header, rule, row = md.splitlines()
    assert header.startswith("| Method | Comp. Single COM | Comp. Multi COM | Dist. Cross COM | Dist. Cross DIS |")
    assert header.endswith("Avg COM | Avg DIS | Avg Overall |")
    assert row == "| tiny | 1.00 | 2.00 | 3.00 | 2.00 | 4.00 | 3.00 | 5.00 | 4.00 | 6.00 | 5.00 | 3.50 | 3.50 | 3.50 |"
    plain = format_table3(s, style="plain", context=True)
    assert "Distinction & Composition" in plain.splitlines()[0]
    assert plain.splitlines()[1].split() == ["Method", "Single", "Multi", "Cross", "Intra", "Cross", "Intra"]
    assert plain.splitlines()[2].split() == ["COM"] * 3 + ["DIS", "COM"] * 3 + ["DIS", "COM", "DIS", "Overall"]
    scone = [l for l in plain.splitlines() if l.startswith("Scone (paper)")][0]
    assert scone.split()[-1] == "8.50" and len(SCONE_TABLE3["Scone"]) == 13
    rich_text = format_table3(s, style="rich")
    assert "tiny" in rich_text and "3.50" in rich_text
    with pytest.raises(ValueError, match="style"):
        format_table3(s, style="html")


def test_missing_task_types_show_dash(tmp_path):
    _write_two_groups(tmp_path)
    row = format_table3(aggregate(tmp_path, "m"), with_std=True).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "m" and cells[1] == "3.00±1.00" and cells[2] == "-" and cells[-1] == "6.50±0.50"


def test_aggregate_command_writes_json_and_returns_table(tmp_path):
    _full_summary(tmp_path)
    out = tmp_path / "metrics" / "tiny.json"
    table = aggregate_command(tmp_path, "tiny", "sconeeval", out)
    data = json.loads(out.read_text())
    assert data["average"]["Overall"] == pytest.approx(3.5) and data["benchmark"] == "sconeeval"
    assert table.splitlines()[2].startswith("| tiny | 1.00")
    # a SconeEval tree is not an OmniContext one: the error names the folder and the expected categories
    with pytest.raises(ValueError, match="no OmniContext category"):
        aggregate_command(tmp_path, "tiny", "omnicontext", None)
    with pytest.raises(ValueError, match="benchmark"):
        aggregate_command(tmp_path, "tiny", "dreambench", None)
    # nor a MICo-Bench one: its lines lack the judged MICo fields
    with pytest.raises(ValueError, match="MICo case .* lacks"):
        aggregate_command(tmp_path, "tiny", "mico", None)


def test_summary_json_has_no_nan(tmp_path):
    write_scores(tmp_path, "c", 1, [{"key": "a", "task_type": "composition_single", "PF_score": 4, "SC_score": 4}])
    out = tmp_path / "c.json"
    aggregate_command(tmp_path, "c", "sconeeval", out)
    data = json.loads(out.read_text())  # strict parse
    assert data["average"]["DIS"] is None and data["average"]["COM"] == 4
    assert math.isnan(aggregate(tmp_path, "c")["average"]["Overall"])
