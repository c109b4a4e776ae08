"""What the VLM judge is asked and which answers it may give."""
import pytest

from evaluation.judges import prompts
from evaluation.judges.prompts import JudgeAnswerError, PresenceAnswer, ScoreAnswer, parse_answer
from test_eval_oracle import distinction_case, multi_case


@pytest.mark.parametrize("raw, score", [
    ('{"reason": "all there", "score": 7}', 7.0),
    ('{"score": 7.5, "reason": "close", "confidence": "high"}', 7.5),  # extra fields are ignored
    ('```json\n{"reason": "fenced", "score": 10}\n```', 10.0),
    ('  {"reason": "", "score": 0}  ', 0.0),
])
def test_score_answers_that_parse(raw, score):
    assert parse_answer(raw, ScoreAnswer, case_key="c", what="PF").score == score


@pytest.mark.parametrize("raw, problem", [
    ("Score: 8. The subjects are all there.", "not JSON"),
    ('{"reason": "x", "score": "7"}', "score: Input should be a valid number"),
    ('{"reason": "x", "score": true}', "score: Input should be a valid number"),
    ('{"reason": "x", "score": 11}', "less than or equal to 10"),
    ('{"reason": "x", "score": -1}', "greater than or equal to 0"),
    ('{"reason": "x", "score": NaN}', "finite number"),
    ('{"score": 5}', "reason: Field required"),
    ("[5]", "expected a JSON object, got list"),
    ("", "not JSON"),
])
def test_bad_score_answers_name_the_case_and_show_the_raw_text(raw, problem):
    with pytest.raises(JudgeAnswerError) as err:
        parse_answer(raw, ScoreAnswer, case_key="d1", what="prompt following")
    message = str(err.value)
    assert message.startswith("case d1: the judge's prompt following answer is unusable")
    assert problem in message and f"raw answer: {raw!r}" in message


def test_presence_answers_are_zero_or_one_integers():
    assert parse_answer('{"reason": "seen", "present": 1}', PresenceAnswer, case_key="c", what="p").present == 1
    for bad in ('{"reason": "x", "present": true}', '{"reason": "x", "present": 2}', '{"reason": "x", "present": "yes"}',
                '{"reason": "x", "present": 1.0}'):
        with pytest.raises(JudgeAnswerError, match="present"):
            parse_answer(bad, PresenceAnswer, case_key="c", what="p")


def test_subject_consistency_names_only_the_targets():
    lines = prompts.target_lines(distinction_case())
    assert lines == [
        '- from image 1: "the red circle" (not "the green triangle", which must be ignored)',
        "- from image 2: its setting (the scene / background)",
    ]
    assert prompts.target_lines(multi_case()) == ['- from image 1: "the person"', '- from image 2: "the square"']
    sc = prompts.subject_consistency(distinction_case())
    assert "2 input images (images 1 and 2" in sc and "distractors" in sc and '"score"' in sc


def test_each_request_asks_for_its_own_answer_shape():
    # the field named in the request is the field parse_answer requires (and what the stub server keys on)
    case = distinction_case()
    for text in (prompts.prompt_following(case), prompts.subject_consistency(case)):
        assert '"score"' in text and '"present"' not in text and case.instruction in text
    text = prompts.presence(case, 0, "the red circle")
    assert '"present"' in text and '"score"' not in text and '"the red circle"' in text
    assert case.instruction not in text  # presence only: the instruction must not sway it


# ---------------------------------------------------------------- the released protocol (evaluation.judges.released)


from evaluation.judges import released  # noqa: E402
from evaluation.judges.released import ReleasedScore, parse_presence, parse_score  # noqa: E402


def test_released_requests_name_no_ground_truth_subject():
    case = distinction_case()  # image 1: the red circle (target) and the green triangle (distractor)
    for text in (released.prompt_following(case), released.subject_consistency(case)):
        assert case.instruction in text and '"score"' in text and '"reasoning"' in text
        assert "green triangle" not in text  # the distractor is never named: the instruction alone names targets
        assert "the first 2 images" in text
    sc = released.subject_consistency(case)
    assert "Compare only the subjects and the scene the instruction names" in sc  # SconeEval: only named subjects
    presence = released.presence("the red circle")
    assert presence.rstrip().endswith("Subject description: the red circle")
    assert "0 or 1" in presence and '"score"' not in presence and case.instruction not in presence


def test_released_scene_variant_follows_the_task_and_case_type():
    scene_case = distinction_case()  # case type 1O1S: a scene reference
    plain = multi_case()  # 1C1O: no scene image (the city is named in words)
    assert released.with_scene(scene_case) and not released.with_scene(plain)
    assert "scene image" in released.subject_consistency(scene_case)
    assert "scene image" not in released.subject_consistency(plain)
    # PF has one guide for every SconeEval task type, as the released scorer runs it
    assert released.prompt_following(scene_case).replace(scene_case.instruction, "") == \
        released.prompt_following(plain).replace(plain.instruction, "")


def test_released_omnicontext_guides_for_omnicontext_categories():
    from types import SimpleNamespace

    omni = SimpleNamespace(task_type="scene_character", case_type="", instruction="put her on the beach",
                           subject_list=[[], []])
    assert released.benchmark_of(omni) == "omnicontext" and released.benchmark_of(multi_case()) == "sconeeval"
    sc = released.subject_consistency(omni)
    assert "scene image" in sc and "Compare only" not in sc  # OmniContext compares every subject
    assert "You receive" not in released.prompt_following(omni)


@pytest.mark.parametrize("raw, score, reason", [
    ('{"score": 7, "reasoning": "all there"}', 7.0, "all there"),
    ('Here you go:\n```json\n{\n    "score": 8,\n    "reasoning": "close,\nbut the hat differs"\n}\n```', 8.0,
     "close,\nbut the hat differs"),
    ('{"score": 6.5, "reasoning": "x", "extra": 1}', 6.5, "x"),
    ("9", 9.0, "(the judge answered with the bare score)"),
])
def test_released_score_answers_that_parse(raw, score, reason):
    answer = parse_score(raw, case_key="c", what="PF")
    assert isinstance(answer, ReleasedScore) and answer.score == score and answer.reason == reason


@pytest.mark.parametrize("raw, problem", [
    ("Score: eight. The subjects are all there.", "no JSON object"),
    ('{"score": 11, "reasoning": "x"}', "less than or equal to 10"),
    ('{"score": "7", "reasoning": "x"}', "score: Input should be a valid number"),
    ('{"score": 7}', "reasoning: Field required"),
    ('{"score": 7, reasoning: x}', "not JSON"),
    ("12", "no JSON object"),
])
def test_released_bad_score_answers_name_the_case_and_show_the_answer(raw, problem):
    with pytest.raises(JudgeAnswerError) as err:
        parse_score(raw, case_key="d1", what="subject consistency")
    message = str(err.value)
    assert message.startswith("case d1: the judge's subject consistency answer is unusable")
    assert problem in message and f"raw answer: {raw!r}" in message


@pytest.mark.parametrize("raw, present", [("1", 1), (" 0\n", 0), ("1.", 1), ("Answer: 0", 0), ("**1**", 1)])
def test_released_presence_answers_are_a_bare_digit(raw, present):
    answer = parse_presence(raw, case_key="c", what="presence")
    assert answer.present == present and answer.reason == raw.strip()


@pytest.mark.parametrize("raw, problem", [("yes", "no 0 or 1"), ("", "no 0 or 1"), ("2", "no 0 or 1"),
                                          ("not 1 but 0", "both 0 and 1")])
def test_released_presence_answers_it_would_have_to_guess_at_are_errors(raw, problem):
    with pytest.raises(JudgeAnswerError, match=f"case d1: the judge's presence of 'x' answer is unusable: .*{problem}"):
        parse_presence(raw, case_key="d1", what="presence of 'x'")


def test_released_inputs_are_capped_near_a_megapixel_and_floored_to_16():
    assert released.input_size(32, 32) == (32, 32)  # small: as it is
    assert released.input_size(1000, 750) == (992, 736)  # floored to multiples of 16
    w, h = released.input_size(3000, 2000)  # 6 MP: down to ~1024^2, aspect kept
    assert w * h <= 1024 * 1024 and w * h > 0.95 * 1024 * 1024 and abs(w / h - 1.5) < 0.02
    assert w % 16 == 0 and h % 16 == 0
    assert released.input_size(8, 40) == (8, 32)  # a side under 16 is kept, not floored to nothing
