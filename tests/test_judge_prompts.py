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
