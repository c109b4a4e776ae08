import dataclasses

import numpy as np
import pytest

from data.formats.srum_rewards import read_rewards, write_rewards
from data.render import render_array
from data.scene import Placement, Scene, Subject
from evaluation.judges import rewards  # the reward protocol of the judge family (evaluation.srum uses it)
from evaluation.judges.rewards import (
    OracleRewardJudge,
    OpenAIRewardJudge,
    SelfRewardJudge,
    isolate,
    layout_band,
    make_reward_judge,
    neutral_band,
    prompt_colours,
    propose_regions,
)
from evaluation.srum import candidate_seed, reward_record
from model.reward_map import reward_map

RED_CIRCLE = Subject("u1", "object", "circle", "red")
BLUE_SQUARE = Subject("u2", "object", "square", "blue")
LEFT, RIGHT = (2, 13, 15, 26), (17, 13, 30, 26)


def scene(*placements, background="beach"):
    return Scene(background, tuple(Placement(s, b) for s, b in placements), 32)


def row(target: Scene, prompt: str, category: str, specified: bool, key="p0"):
    return {"key": key, "category": category, "prompt": prompt, "target": target, "layout_specified": specified}


SPATIAL = row(scene((RED_CIRCLE, LEFT), (BLUE_SQUARE, RIGHT)), "a red circle on the left of a blue square at the beach",
              "spatial", True)
PAIR = row(scene((RED_CIRCLE, LEFT), (BLUE_SQUARE, RIGHT)), "a red circle and a blue square at the beach", "shape", False)


def judge(r, image):
    return OracleRewardJudge().judge(r, image, propose_regions(image, r))


def test_bands_follow_the_scoring_guide():
    assert layout_band(1.0) == 1.0 and layout_band(1.0, exact_counts=False) == 0.9
    assert layout_band(0.5) == pytest.approx(0.5) and layout_band(2 / 3) == pytest.approx(0.5 + 0.8 / 6)
    assert layout_band(1 / 3) == pytest.approx(-0.9 + 0.8 / 3) and layout_band(0.0) == -1.0
    assert -0.9 <= layout_band(0.01) < -0.5
    assert neutral_band(1.0) == pytest.approx(0.4) and neutral_band(0.0) == pytest.approx(-0.4)
    assert neutral_band(0.5) == 0.0


def test_prompt_colours_come_from_the_text():
    assert prompt_colours(SPATIAL) == ["red", "blue"]
    nameless = dict(PAIR, prompt="two things")
    assert prompt_colours(nameless) == ["red", "blue"]  # falls back to the target scene's colours


def test_region_proposals_keep_prompt_colours_only():
    distractor = Subject("u3", "object", "triangle", "green", size="small")
    image = render_array(scene((RED_CIRCLE, LEFT), (BLUE_SQUARE, RIGHT), (distractor, (12, 2, 21, 11))))
    regions = propose_regions(image, PAIR)
    assert sorted(r.colour for r in regions) == ["blue", "red"]
    by = {r.colour: r.bbox for r in regions}
    assert by["blue"] == RIGHT  # a square fills its box
    assert by["red"][0] >= LEFT[0] and by["red"][2] <= LEFT[2]
    assert len(propose_regions(image, PAIR, max_regions=1)) == 1


def test_oracle_perfect_render_scores_full_marks_within_the_bands():
    g, regions = judge(SPATIAL, render_array(SPATIAL["target"]))
    assert g.score == 1.0 and "100%" in g.reason
    assert [r.score for r in regions] == [1.0, 1.0]
    assert {r.object for r in regions} == {"red circle", "blue square"}
    g, regions = judge(PAIR, render_array(PAIR["target"]))
    assert g.score == pytest.approx(0.4) and "neutral" in g.reason  # no stated layout: never above the band
    assert [r.score for r in regions] == [1.0, 1.0]


def test_oracle_swapped_layout_contradicts_a_stated_layout_only():
    swapped = render_array(scene((RED_CIRCLE, RIGHT), (BLUE_SQUARE, LEFT)))
    g, regions = judge(SPATIAL, swapped)
    assert g.score == -1.0
    assert all(r.score >= 0.5 for r in regions)  # the subjects themselves are fine
    g, _ = judge(PAIR, swapped)
    assert g.score == pytest.approx(0.4)  # the pair prompt never asked for sides


def test_oracle_missing_subject():
    only_red = render_array(scene((RED_CIRCLE, LEFT)))
    g, regions = judge(SPATIAL, only_red)
    assert g.score == -1.0 and len(regions) == 1
    g, _ = judge(PAIR, only_red)
    # found 1/2, counts right for 1 of 2 colours -> quality 0.5 -> the middle of the neutral band
    assert g.score == pytest.approx(0.0)
    g, regions = judge(PAIR, render_array(scene()))
    assert g.score == pytest.approx(-0.4) and regions == []


def test_oracle_wrong_shape_is_a_severe_flaw():
    wrong = render_array(scene((dataclasses.replace(RED_CIRCLE, category="triangle"), LEFT), (BLUE_SQUARE, RIGHT)))
    g, regions = judge(PAIR, wrong)
    by = {r.object: r for r in regions}
    assert -0.9 <= by["red circle"].score <= -0.5 and "triangle" in by["red circle"].reason
    assert by["blue square"].score == 1.0


def test_oracle_extra_copy_is_penalised_and_counts_lower_the_global():
    extra = (dataclasses.replace(RED_CIRCLE, uid="u9", size="small"), (12, 2, 21, 11))
    image = render_array(scene((RED_CIRCLE, LEFT), (BLUE_SQUARE, RIGHT), extra))
    g, regions = judge(PAIR, image)
    scores = sorted(r.score for r in regions)
    assert len(regions) == 3 and scores[1:] == [1.0, 1.0]
    assert -0.9 <= scores[0] <= -0.5 and "extra" in [r for r in regions if r.score < 0][0].reason
    assert g.score < 0.4  # the red count is wrong


def test_record_round_trips_through_the_reward_format_and_builds_the_map(tmp_path):
    image = render_array(SPATIAL["target"])
    rec = reward_record(SPATIAL, image, propose_regions(image, SPATIAL), OracleRewardJudge(), {"candidate": 0})
    assert rec["vlm_rewards"][0] == {"object": "global_layout_reward", "bbox": [0, 0, 32, 32], "score": 1.0,
                                     "reason": rec["vlm_rewards"][0]["reason"]}
    back = read_rewards(write_rewards(tmp_path / "r.jsonl", [rec]))
    assert back[0]["key"] == "p0" and len(back[0]["vlm_rewards"]) == 3
    rmap = reward_map(back[0]["vlm_rewards"], 32, 32)
    assert rmap[20, 20] == 1.0  # inside the blue square's box
    assert rmap[2, 2] == 0.5  # sky: unjudged, neutral; global 1 leaves it as is


def test_isolate_blanks_everything_but_the_region():
    image = render_array(PAIR["target"])
    out = isolate(image, RIGHT)
    x0, y0, x1, y1 = RIGHT
    np.testing.assert_array_equal(out[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1], image[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1])
    assert not (out[:, :x0 - 1] == (220, 40, 40)).all(axis=-1).any()  # the red circle is gone
    np.testing.assert_array_equal(out[0, 0], image[0, 0])  # sky stays sky


class FakePipeline:
    """A pipeline whose understanding answers P(yes) by question, recording what was asked."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def yes_probability(self, images, questions):
        self.asked += list(questions)
        assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
        return np.array([self.answers.get(q, 0.5) for q in questions])


def test_self_judge_scores_two_p_minus_one():
    fake = FakePipeline({"is there a red circle": 0.9, "is there a blue square": 0.2,
                         "is the red circle on the left": 1.0, "is the blue square on the right": 0.5})
    image = render_array(SPATIAL["target"])
    regions = propose_regions(image, SPATIAL)
    g, judged = SelfRewardJudge(fake).judge(SPATIAL, image, regions)
    by = {r.object: r.score for r in judged}
    assert by["red circle"] == pytest.approx(0.8) and by["blue square"] == pytest.approx(-0.6)
    assert g.score == pytest.approx(2 * 0.75 - 1)  # mean P(yes) of the two stated positions
    assert "is the red circle on the left" in fake.asked
    g, _ = SelfRewardJudge(fake).judge(PAIR, image, [])
    assert g.score == pytest.approx(neutral_band((0.9 + 0.2) / 2))


def test_self_judge_with_a_model_without_preference_is_neutral(bagel_release, tmp_path):
    # an LM head of zeros: P(yes) = 0.5 for every question -> every score 0. (The toy model's fresh head was zero;
    # BAGEL's fresh LM head is random, so the release is edited to have none.)
    from model.pipeline import load_pipeline
    from release_edit import LM_HEAD, copy_with_weights, zeros

    pipeline = load_pipeline(copy_with_weights(bagel_release, tmp_path / "ckpt", {LM_HEAD: zeros}))
    j = make_reward_judge("self", pipeline=pipeline)
    image = render_array(SPATIAL["target"])
    g, judged = j.judge(SPATIAL, image, propose_regions(image, SPATIAL))
    assert g.score == pytest.approx(0.0, abs=1e-6) and [r.score for r in judged] == pytest.approx([0.0, 0.0], abs=1e-6)


def _srum_openai_judge(server, tmp_path, **changes):
    from evaluation.config import OpenAIJudgeConfig
    from evaluation.judges.openai import OpenAIJudge

    cfg = dict(base_url=server.base_url, cache_dir=str(tmp_path / "cache"), backoff_s=0.001, backoff_max_s=0.01,
               timeout_s=5.0, max_retries=2)
    cfg.update(changes)
    return make_reward_judge("openai", openai_cfg=OpenAIJudgeConfig(**cfg))


def test_openai_judge_against_the_local_endpoint(tmp_path, monkeypatch):
    import json

    from benchmarks.openai_stub import StubServer, answer_for, request_parts

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    image = render_array(SPATIAL["target"])
    regions = propose_regions(image, SPATIAL)
    assert len(regions) == 2
    with StubServer() as server:
        judge = _srum_openai_judge(server, tmp_path)
        g, judged = judge.judge(SPATIAL, image, regions)
        bodies = server.bodies()
        assert len(bodies) == 2  # one global and one regional request, sent together
        layout_body = next(b for b in bodies if '"regions"' not in request_parts(b)[0])
        region_body = next(b for b in bodies if '"regions"' in request_parts(b)[0])
        want_g = json.loads(answer_for(layout_body))
        want_r = json.loads(answer_for(region_body))["regions"]
        assert g.score == want_g["score"] and g.reason == "stub layout"
        assert [j.score for j in judged] == [r["score"] for r in want_r] and judged[1].object == "stub object 2"
        text = request_parts(region_body)[0]
        assert SPATIAL["prompt"] in text and f"Region 2: box {list(regions[1].bbox)}" in text
        assert "states where things go" in request_parts(layout_body)[0]

        # a prompt without layout intent: the global score is held to the neutral band
        g2, _ = judge.judge(PAIR, image, [])
        assert -0.4 <= g2.score <= 0.4
        assert judge.client.usage()["calls"]["srum_layout"] == 2
        judge.client.close()

        # the same questions again come from the cache: no new requests
        before = server.stats()["requests"]
        again = _srum_openai_judge(server, tmp_path)
        assert again.judge(SPATIAL, image, regions)[0].score == g.score
        assert server.stats()["requests"] == before and again.client.usage()["cache_hits"] == 2
        again.client.close()


def test_openai_judge_rejects_prose_naming_the_request(tmp_path, monkeypatch):
    from evaluation.judges.prompts import JudgeAnswerError
    from benchmarks.openai_stub import StubServer

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    image = render_array(SPATIAL["target"])
    with StubServer(garbage=True) as server:
        judge = _srum_openai_judge(server, tmp_path, cache=False)
        with pytest.raises(JudgeAnswerError, match="case p0: the judge's global layout answer is unusable"):
            judge.judge(SPATIAL, image, [])
        assert server.stats()["requests"] == 3  # asked again max_retries times before giving up
        judge.client.close()


def test_region_answers_missing_a_region_count_as_neutral_with_a_warning():
    answer = rewards.RegionsAnswer(regions=[rewards.RegionAnswer(region=2, object="box", reason="ok", score=0.5),
                                         rewards.RegionAnswer(region=9, object="?", reason="out of range", score=1.0)])
    with pytest.warns(UserWarning, match=r"region\(s\) \[1, 3\]"):
        out = rewards.regions_from_answer(answer, 3, "p0")
    assert [j.score for j in out] == [0.0, 0.5, 0.0] and out[1].object == "box"
    with pytest.raises(Exception, match="less than or equal to 1"):
        rewards.LayoutAnswer(reason="x", score=3.0)


def test_unknown_judge_names_the_choices():
    with pytest.raises(ValueError, match="unknown SRUM judge"):
        make_reward_judge("gpt")


def test_candidate_seeds_differ_across_rounds_and_candidates():
    seeds = {candidate_seed(0, r, k) for r in range(3) for k in range(4)}
    assert len(seeds) == 12 and candidate_seed(0, 1, 2) == candidate_seed(0, 1, 2)


def test_layout_specified_falls_back_to_the_category():
    assert rewards.layout_specified({"category": "complex"}) and not rewards.layout_specified({"category": "numeracy"})
