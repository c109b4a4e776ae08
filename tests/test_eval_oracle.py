"""Colour-blob detection and the oracle judge on renders of known scenes."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from data.records import Case
from data.render import render_array
from data.scene import Placement, Scene, Subject
from evaluation.detect import aligned_mask_iou, detect, merge, texture_similarity
from evaluation.judges import Judge, make_judge
from evaluation.judges.oracle import OracleJudge, background_source
from evaluation.runner import judge_case


def subj(uid, category, colour, texture="plain", domain="object"):
    return Subject(uid, domain, category, colour, texture, "large")


RED = subj("r", "circle", "red", "striped")
GREEN = subj("g", "triangle", "green")
BLUE = subj("b", "person", "blue", "dotted", domain="character")
YELLOW = subj("y", "square", "yellow")


def distinction_case():
    """Image 1 holds the red circle (wanted) and a green triangle; image 2 is the beach."""
    ref1 = Scene("city", (Placement(RED, (2, 10, 14, 22)), Placement(GREEN, (18, 10, 30, 22))))
    ref2 = Scene("beach")
    target = Scene("beach", (Placement(RED, (4, 8, 16, 20)),))
    return Case(
        "d1", "distinction_cross", "1O1S", "put the red circle from image 1 in the scene from image 2",
        [ref1, ref2], target, [["the red circle", "the green triangle"], []], [[1, 0], []],
    )


def multi_case():
    """Compose the blue person (image 1) and the yellow square (image 2), background named in words."""
    ref1 = Scene("forest", (Placement(BLUE, (10, 6, 22, 26)),))
    ref2 = Scene("snow", (Placement(YELLOW, (8, 8, 20, 20)),))
    target = Scene("city", (Placement(BLUE, (2, 6, 14, 26)), Placement(YELLOW, (18, 10, 28, 20))))
    return Case(
        "m1", "composition_multi", "1C1O", "put the person of image 1 on the left and the square of image 2 on the right in the city",
        [ref1, ref2], target, [["the person"], ["the square"]], [[1], [1]],
    )


# ---------------------------------------------------------------- detection


def test_detect_finds_exact_blobs_and_ignores_noise():
    scene = Scene("beach", (Placement(YELLOW, (3, 5, 13, 15)), Placement(RED, (16, 4, 28, 16))))
    dets = {d.colour: d for d in detect(render_array(scene))}
    assert set(dets) == {"yellow", "red"}
    assert dets["yellow"].bbox == (3, 5, 13, 15) and dets["yellow"].area == 100
    assert dets["yellow"].mark_fraction == 0.0
    # the striped circle is one blob: its darker stripes are marks of the same subject
    assert dets["red"].bbox == (16, 4, 28, 16) and 0.3 < dets["red"].mark_fraction < 0.7
    floats = {d.colour: d.bbox for d in detect(render_array(scene) / 255.0)}
    assert floats == {"yellow": (3, 5, 13, 15), "red": (16, 4, 28, 16)}
    rng = np.random.default_rng(0)
    assert all(detect(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) == [] for _ in range(20))
    assert detect(np.zeros((32, 32, 3), np.uint8)) == []


def test_detect_shape_texture_descriptors_and_merge():
    a = detect(render_array(Scene("beach", (Placement(RED, (4, 4, 16, 16)),))))[0]
    moved = detect(render_array(Scene("beach", (Placement(RED, (10, 12, 22, 24)),))))[0]
    square = detect(render_array(Scene("beach", (Placement(subj("r", "square", "red", "striped"), (4, 4, 16, 16)),))))[0]
    plain = detect(render_array(Scene("beach", (Placement(subj("r", "circle", "red"), (4, 4, 16, 16)),))))[0]
    assert aligned_mask_iou(moved, a) == 1.0 and texture_similarity(moved, a) == 1.0
    assert aligned_mask_iou(square, a) < 0.9 and texture_similarity(plain, a) == 0.0
    both = merge([a, moved])
    assert both.area == (a.mask | moved.mask).sum() and both.bbox == (4, 4, 22, 24)


# ---------------------------------------------------------------- oracle judge


def test_oracle_satisfies_the_judge_protocol():
    judge = make_judge("oracle")
    assert isinstance(judge, Judge) and judge.name == "oracle" and judge.deterministic


def test_perfect_render_scores_ten_and_answers_presence_right():
    judge = OracleJudge()
    for case in (distinction_case(), multi_case()):
        image = render_array(case.target)
        pf, sc, (pf_reason, sc_reason) = judge.composition(case, image)
        assert pf == pytest.approx(10.0) and sc == pytest.approx(10.0), (pf_reason, sc_reason)
        answers = [[judge.presence(case, i, p, image)[0] for p in phrases] for i, phrases in enumerate(case.subject_list)]
        assert answers == case.subject_label
    line = judge_case(judge, distinction_case(), render_array(distinction_case().target))
    assert line["DIS_acc"] == line["DIS_f1"] == line["DIS"] == 10.0 and line["COM"] == pytest.approx(10.0)


def test_every_benchmark_case_rendered_perfectly_scores_ten():
    from data.build import bench_cases
    from data.config import DataConfig

    judge = OracleJudge()
    cases = bench_cases(DataConfig(sizes={"bench_per_task": 2}))
    assert {c.task_type for c in cases} == {
        "composition_single", "composition_multi", "distinction_cross", "distinction_intra",
        "distinction_composition_cross", "distinction_composition_intra",
    }
    for case in cases:
        line = judge_case(judge, case, render_array(case.target))
        assert line["PF_score"] == pytest.approx(10.0) and line["SC_score"] == pytest.approx(10.0), line
        assert line.get("DIS", 10.0) == 10.0, line


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_blank_or_noise_scores_near_zero(kind):
    judge = OracleJudge()
    image = (
        np.zeros((32, 32, 3), np.uint8) if kind == "blank"
        else np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    )
    for case in (distinction_case(), multi_case()):
        pf, sc, _ = judge.composition(case, image)
        assert pf < 0.5 and sc < 0.5, (case.key, pf, sc)
    line = judge_case(judge, distinction_case(), image)
    assert line["DIS_pred"] == [[0, 0], []]
    # nothing predicted: accuracy 1/2 (the distractor is rightly absent), precision/recall/F1 0
    assert (line["DIS_acc"], line["DIS_prec"], line["DIS_recall"], line["DIS_f1"]) == (5.0, 0.0, 0.0, 0.0)


def test_wrong_subject_is_a_distinction_failure():
    judge = OracleJudge()
    case = distinction_case()
    wrong = render_array(Scene("beach", (Placement(GREEN, (4, 8, 16, 20)),)))
    line = judge_case(judge, case, wrong)
    assert line["DIS_pred"] == [[0, 1], []]
    assert line["DIS_acc"] == 0.0 and line["DIS_f1"] == 0.0 and line["DIS"] == 0.0
    assert line["PF_score"] == 0.0  # the required subject is missing, and a distractor was drawn
    assert "distractor green triangle from image 1" in line["PF_score_reason"]
    # both subjects: the required one is right, the distractor halves PF and is a false positive
    both = render_array(Scene("beach", (Placement(RED, (4, 8, 16, 20)), Placement(GREEN, (18, 8, 30, 20)))))
    line = judge_case(judge, case, both)
    assert line["PF_score"] == pytest.approx(5.0) and line["DIS_pred"] == [[1, 1], []]
    assert line["DIS_prec"] == 5.0 and line["DIS_recall"] == 10.0


def test_missing_subject_drops_pf_and_sc_by_half():
    judge = OracleJudge()
    case = multi_case()
    only_person = render_array(Scene("city", case.target.placements[:1]))
    pf, sc, (pf_reason, sc_reason) = judge.composition(case, only_person)
    # two required subjects, one perfect and one missing; the background is right
    assert pf == pytest.approx(5.0) and sc == pytest.approx(5.0)
    assert "1/2 required subjects found" in pf_reason and "square: not generated" in sc_reason


def test_partial_credit_orders_degradations():
    judge = OracleJudge()
    case = distinction_case()
    perfect = render_array(case.target)
    blurred = np.asarray(Image.fromarray(perfect).filter(ImageFilter.GaussianBlur(1.0)))
    shifted = render_array(Scene("beach", (Placement(RED, (12, 14, 24, 26)),)))
    wrong_bg = render_array(Scene("night", case.target.placements))
    pf_b, sc_b, _ = judge.composition(case, blurred)
    pf_s, sc_s, _ = judge.composition(case, shifted)
    pf_w, sc_w, _ = judge.composition(case, wrong_bg)
    assert 7.0 < pf_b < 10.0 and 7.0 < sc_b < 10.0  # blur costs a little, not everything
    assert 0.0 < pf_s < pf_b and sc_s > 8.0  # misplaced: PF suffers, identity does not
    assert pf_w == pytest.approx(10.0) and sc_w == pytest.approx(5.0, abs=0.05)  # scene from image 2 is SC's
    # a background named in words is part of PF instead
    pf_t, sc_t, (reason, _) = judge.composition(multi_case(), render_array(Scene("night", multi_case().target.placements)))
    # (night's ground is close to the city's, so the agreement is partial: PF between 7.5 and 10)
    assert 7.5 <= pf_t <= 9.0 and sc_t == pytest.approx(10.0) and "named in the instruction" in reason


def test_resized_output_is_judged_at_the_scene_size():
    judge = OracleJudge()
    case = distinction_case()
    big = np.asarray(Image.fromarray(render_array(case.target)).resize((64, 64), Image.NEAREST))
    pf, sc, _ = judge.composition(case, big)
    assert pf > 9.0 and sc > 9.0


def test_background_source_and_missing_ground_truth():
    assert background_source(distinction_case()) == "reference"
    assert background_source(multi_case()) == "text"
    case = multi_case()
    case.instruction = "put the person of image 1 next to the square of image 2"
    assert background_source(case) is None
    no_truth = Case("x", "composition_single", "1O", "draw it", [None], None, [["the circle"]], [[1]])
    with pytest.raises(ValueError, match="ground_truth"):
        OracleJudge().composition(no_truth, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="not a candidate"):
        OracleJudge().presence(distinction_case(), 0, "the blue robot", np.zeros((32, 32, 3), np.uint8))


def test_presence_reason_names_the_numbers():
    present, reason = OracleJudge().presence(distinction_case(), 0, "the green triangle", render_array(distinction_case().target))
    assert present == 0 and "green" in reason and "absent" in reason and "px" in reason
