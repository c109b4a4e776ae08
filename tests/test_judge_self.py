"""The self judge: questions in the model's own vocabulary, calibrated PF / SC / presence, wiring."""
import itertools

import numpy as np
import pytest

from data.instructions import VOCABULARY, describe, qa_position, qa_there
from data.records import Case
from data.render import render_array
from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, TEXTURES, Placement, Scene, Subject
from data.world import slot_bbox
from evaluation.config import EvalConfig
from evaluation.judges import Judge, make_judge
from evaluation.judges.self import Desc, SelfJudge, lift
from evaluation.runner import evaluate_checkpoint
from test_eval_oracle import BLUE, YELLOW, distinction_case

WORDS = set(VOCABULARY)


class FakePipeline:
    """A pipeline whose understanding answers P(yes) by question (0.5 when not listed), recording every call."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def yes_probability(self, images, questions):
        assert len(images) == len(questions)
        for q in questions:
            unknown = [w for w in q.split() if w not in WORDS]
            assert not unknown, f"{q!r}: {unknown} are not in the vocabulary the chain's tokenizer is trained on"
        self.calls.append(list(questions))
        return np.array([self.answers.get(q, 0.5) for q in questions])


def placed_case():
    """Two subjects the instruction places (left / right of a pair) in a scene named in words."""
    person = Placement(BLUE, slot_bbox("pair", "left", BLUE.size, 32))
    square = Placement(YELLOW, slot_bbox("pair", "right", YELLOW.size, 32))
    refs = [Scene("forest", (Placement(BLUE, (10, 6, 22, 26)),)), Scene("snow", (Placement(YELLOW, (8, 8, 20, 20)),))]
    return Case(
        "p1", "composition_multi", "1C1O",
        "put the person of image 1 on the left and the square of image 2 on the right in the city",
        refs, Scene("city", (person, square)), [["the person"], ["the square"]], [[1], [1]],
    )


def test_descriptions_are_the_training_templates():
    for cat, colour, tex in itertools.product(OBJECT_CATEGORIES + CHARACTER_CATEGORIES, COLOURS, TEXTURES):
        s = Subject("u", "character" if cat in CHARACTER_CATEGORIES else "object", cat, colour, tex)
        assert Desc.of(s).text() == describe(s) and Desc.of(s).text("the") == describe(s, "the")
    assert Desc.from_phrase("the small left striped red circle", "k") == Desc("object", "circle", "red", "striped")
    assert Desc.from_phrase("the person in yellow", "k").text() == "a person in yellow"
    assert Desc.from_phrase("the robot", "k").text() == "a robot"
    with pytest.raises(ValueError, match="case k: the phrase 'the thing'"):
        Desc.from_phrase("the thing", "k")


def test_lift():
    assert lift(0.9, 0.2) == pytest.approx(0.875)
    assert lift(0.5, 0.5) == 0.0 and lift(0.1, 0.6) == 0.0 and lift(1.0, 0.0) == 1.0 and lift(1.0, 1.0) == 0.0


def test_distinction_case_hand_computed():
    # d1: wanted the striped red circle (image 1), distractor green triangle, scene from image 2 (beach).
    # counterfactuals: colour blue (first unused), texture plain, category square (first unused object)
    f = FakePipeline({
        "is there a striped red circle": 0.9,
        "is there a striped red square": 0.2,   # another kind
        "is there a striped blue circle": 0.3,  # another colour
        "is there a red circle": 0.6,           # another texture
        "is there a green triangle": 0.4,
        "is there a green square": 0.2,
        "is this at the beach": 0.8,
        "is this in the forest": 0.2,
    })
    judge = SelfJudge(f)
    assert isinstance(judge, Judge) and judge.deterministic
    case = distinction_case()
    image = render_array(case.target)
    pf, sc, (pf_reason, sc_reason) = judge.composition(case, image)
    presence = (0.9 - 0.2) / 0.8  # 0.875
    extra = (0.4 - 0.2) / 0.8  # the distractor is somewhat there: PF x 1 / 1.25
    assert pf == pytest.approx(10 * presence / (1 + extra))  # 7.0; no position asked for a lone subject
    identity = ((0.9 - 0.3) / 0.7 + (0.9 - 0.6) / 0.4) / 2
    background = (0.8 - 0.2) / 0.8  # the scene comes from a reference image: an SC item
    assert sc == pytest.approx(10 * (identity + background) / 2)
    assert "striped red circle" in pf_reason and "x0.80" in pf_reason and "beach" in sc_reason
    assert len(f.calls) == 1  # one batched understanding call per case
    assert judge.presence(case, 0, "the red circle", image)[0] == 1  # 0.9 >= 0.5 and > 0.3
    assert judge.presence(case, 0, "the green triangle", image)[0] == 0  # 0.4 < 0.5
    assert f.calls[1:] == [["is there a blue triangle"]]  # everything else was answered already


def test_positions_and_a_background_named_in_words():
    f = FakePipeline({
        "is there a person in dotted blue": 1.0,
        "is there a robot in dotted blue": 0.0,
        "is the person in dotted blue on the left": 0.9,
        "is the person in dotted blue on the right": 0.1,
        "is there a yellow square": 0.5,
        "is there a yellow circle": 0.5,
        "is the yellow square on the right": 0.6,
        "is the yellow square on the left": 0.2,
        "is this in the city": 0.75,
        "is this at the beach": 0.5,
    })
    case = placed_case()
    assert qa_position(BLUE, "left") == "is the person in dotted blue on the left"  # the trained wording
    pf, sc, _ = SelfJudge(f).composition(case, render_array(case.target))
    person = 0.4 * 1.0 + 0.6 * (0.9 - 0.1) / 0.9
    square = 0.4 * 0.0 + 0.6 * (0.6 - 0.2) / 0.8
    background = 0.75 + 0.25 * (0.75 - 0.5) / 0.5
    assert pf == pytest.approx(10 * (person + square) / 2 * background)
    # SC: colour contrasts are red (first unused), texture contrasts plain / striped; all at 0.5 here
    person_sc = ((1.0 - 0.5) / 0.5 + (1.0 - 0.5) / 0.5) / 2
    assert sc == pytest.approx(10 * (person_sc + 0.0) / 2)


def test_phrases_stand_in_when_the_benchmark_has_no_scenes():
    f = FakePipeline({"is there a red circle": 0.8, "is there a blue circle": 0.1})
    d = distinction_case()
    case = Case(d.key, d.task_type, d.case_type, d.instruction, [None, None], None, d.subject_list, d.subject_label)
    present, reason = SelfJudge(f).presence(case, 0, "the red circle", np.zeros((32, 32, 3), np.uint8))
    assert present == 1 and "'is there a red circle' 0.80" in reason
    pf, sc, _ = SelfJudge(f).composition(case, np.zeros((32, 32, 3), np.uint8))
    assert all(q.startswith("is there") for q in f.calls[-1])  # no target: nothing about positions or scenes


def test_a_model_without_preference_gives_no_credit_and_the_factory_loads_checkpoints(bagel_release, tmp_path):
    # a release whose LM head is zero answers 0.5 to everything: every lift is 0, nothing is present. (The toy
    # model's fresh head was zero; BAGEL's fresh LM head is random, so the release is edited to have none.)
    from model.pipeline import load_pipeline
    from release_edit import LM_HEAD, copy_with_weights, zeros

    ckpt = copy_with_weights(bagel_release, tmp_path / "ckpt", {LM_HEAD: zeros})
    judge = make_judge("self", EvalConfig(judge="self"), checkpoint_dir=ckpt)
    assert isinstance(judge, SelfJudge) and judge.concurrency == 1
    case = distinction_case()
    image = render_array(case.target)
    pf, sc, _ = judge.composition(case, image)
    assert pf == pytest.approx(0.0, abs=1e-6) and sc == pytest.approx(0.0, abs=1e-6)
    assert judge.presence(case, 0, "the red circle", image)[0] == 0
    assert judge.ask(image, ["is there a red circle"])["is there a red circle"] == pytest.approx(0.5, abs=1e-6)
    # the release as made (a random LM head) has preferences: the zero answers above are the edited head's
    fresh = load_pipeline(bagel_release)
    assert abs(float(fresh.yes_probability([image], ["is there a red circle"])[0]) - 0.5) > 1e-3
    assert make_judge("self", EvalConfig(judge="self"), pipeline=fresh).pipeline is fresh
    with pytest.raises(ValueError, match="checkpoint_dir"):
        make_judge("self", EvalConfig(judge="self"))


def test_runner_asks_a_deterministic_self_judge_once_per_round(tmp_path):
    f = FakePipeline({"is there a striped red circle": 1.0, "is there a striped red square": 0.0})
    case = distinction_case()
    s = evaluate_checkpoint(lambda ex, seed: [render_array(case.target)], [case], tmp_path, "m",
                            EvalConfig(judge="self", rounds=1, scorings=3), SelfJudge(f))
    assert s["groups"] == 3 and len(f.calls) == 2  # composition batch + the distractor's colour contrast
    assert qa_there(case.references[0].placements[0].subject) in f.calls[0]
