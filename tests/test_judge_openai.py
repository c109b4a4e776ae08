"""The openai judge against the local stub endpoint: both protocols, parsing, retries, failures, cache, concurrency,
cost."""
import base64
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.openai_stub import StubServer, answer_for, request_parts
from data.openai_cache import AnswerCache, answer_key, request_digest
from data.openai_client import (
    LOOPBACK_PLACEHOLDER_KEY,
    ChatClient,
    EndpointConfigError,
    RequestError,
    backoff_delay,
    retry_after_s,
)
from data.render import render_array
from evaluation.config import EvalConfig, OpenAIJudgeConfig
from evaluation.judges import Judge, make_judge
from evaluation.judges.openai import OpenAIJudge, chat_messages
from evaluation.judges.prompts import JudgeAnswerError
from evaluation.runner import evaluate_checkpoint, judge_case
from test_eval_oracle import distinction_case, multi_case


@pytest.fixture
def server():
    with StubServer(latency_s=0.0) as s:
        yield s


@pytest.fixture(autouse=True)
def no_endpoint_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def make(server, tmp_path, **changes) -> OpenAIJudge:
    cfg = dict(base_url=server.base_url, cache_dir=str(tmp_path / "cache"), backoff_s=0.001, backoff_max_s=0.01,
               timeout_s=5.0, max_retries=3)
    cfg.update(changes)
    return OpenAIJudge(OpenAIJudgeConfig(**cfg))


def expected(body: dict) -> dict:
    return json.loads(answer_for(body))


def decode_png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def decode_jpeg(url: str) -> Image.Image:
    assert url.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.format == "JPEG"
    return img


def test_strict_protocol_answers_parse_and_requests_carry_the_labelled_images(server, tmp_path):
    case = distinction_case()
    image = render_array(case.target)
    with make(server, tmp_path, protocol="strict") as judge:
        assert isinstance(judge, Judge) and judge.name == "openai" and judge.deterministic is False
        pf, sc, (pf_reason, sc_reason) = judge.composition(case, image)
        present, reason = judge.presence(case, 0, "the green triangle", image)
    pf_body, sc_body, presence_body = server.bodies()
    kinds = {request_parts(b)[0].count("Rate how faithfully"): b for b in (pf_body, sc_body)}
    pf_body, sc_body = kinds[0], kinds[1]  # the two composition requests may arrive in either order
    assert (pf, pf_reason) == (expected(pf_body)["score"], expected(pf_body)["reason"])
    assert (sc, sc_reason) == (expected(sc_body)["score"], expected(sc_body)["reason"])
    assert (present, reason) == (expected(presence_body)["present"], expected(presence_body)["reason"])
    # composition shows both references and the output; presence the reference and the output
    pf_text, pf_images = request_parts(pf_body)
    assert len(pf_images) == 3 and len(request_parts(presence_body)[1]) == 2
    assert decode_png(pf_images[0]).size == (256, 256)  # the 32 px render, upscaled for the VLM
    upscaled = decode_png(pf_images[2]).convert("RGB").resize((32, 32), Image.NEAREST)
    assert (render_array(case.target) == np.asarray(upscaled)).all()
    assert case.instruction in pf_text and '"the red circle"' in request_parts(sc_body)[0]
    assert '"the green triangle"' in request_parts(sc_body)[0]  # strict: the distractor is named to the judge
    assert '"the green triangle"' in request_parts(presence_body)[0]
    assert pf_body["model"] == "gpt-4.1" and pf_body["messages"][0]["role"] == "system"
    assert judge.protocol == "strict" and judge.usage()["protocol"] == "strict"


def _image_file(path, w, h, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def test_released_protocol_is_the_default_and_sends_what_the_released_scoring_sends(server, tmp_path):
    # a large input (3000 x 2000, 6 MP) and the scene image as files, as a benchmark read from disk carries them
    case = dataclasses.replace(distinction_case(), meta={"input_images": [
        _image_file(tmp_path / "in1.png", 3000, 2000), _image_file(tmp_path / "in2.png", 40, 24, seed=1)]})
    output = np.random.default_rng(2).integers(0, 256, (72, 104, 3), dtype=np.uint8)  # not square, not the input size
    with make(server, tmp_path) as judge:
        assert judge.protocol == "released" == OpenAIJudgeConfig().protocol
        pf, sc, (pf_reason, sc_reason) = judge.composition(case, output)
        present, reason = judge.presence(case, 0, "the green triangle", output)
    bodies = server.bodies()
    assert len(bodies) == 3
    for body in bodies:  # one user message, no system prompt, the text then unlabelled images
        assert [m["role"] for m in body["messages"]] == ["user"]
        parts = body["messages"][0]["content"]
        assert parts[0]["type"] == "text" and all(p["type"] == "image_url" for p in parts[1:])
        assert body["messages"][0]["content"][0]["text"] == request_parts(body)[0]
    composition = [b for b in bodies if '"reasoning"' in request_parts(b)[0]]
    presence_body = next(b for b in bodies if b not in composition)
    for body in composition:
        text, urls = request_parts(body)
        assert case.instruction in text and "green triangle" not in text  # no ground-truth subject list
        big, scene, generated = (decode_jpeg(u) for u in urls)
        assert generated.size == (104, 72)  # the generated image at its own size
        w, h = big.size  # the large input capped near 1024^2 pixels, aspect kept, sides multiples of 16
        assert 0.95 * 1024 * 1024 < w * h <= 1024 * 1024 and w % 16 == 0 and h % 16 == 0 and abs(w / h - 1.5) < 0.02
        assert scene.size == (32, 16)  # a small input: its sides floored to multiples of 16 (40 x 24 -> 32 x 16)
        want = json.loads(answer_for(body))
        assert want["score"] in (pf, sc) and want["reasoning"] in (pf_reason, sc_reason)
    text, urls = request_parts(presence_body)
    assert text.rstrip().endswith("Subject description: the green triangle") and case.instruction not in text
    assert [decode_jpeg(u).size for u in urls] == [(w, h), (104, 72)]  # reference image 1, then the output
    assert (present, reason) == (int(answer_for(presence_body)), answer_for(presence_body))


def test_a_malformed_answer_names_the_case_and_loses_no_score_already_computed(server, tmp_path):
    case = distinction_case()
    image = render_array(case.target)
    with make(server, tmp_path, max_retries=1) as judge:
        scores = judge.composition(case, image)
        first = judge.presence(case, 0, "the red circle", image)
        server.configure(garbage=True)
        with pytest.raises(JudgeAnswerError) as err:
            judge.presence(case, 0, "the green triangle", image)
    message = str(err.value)
    assert message.startswith("case d1: the judge's presence of 'the green triangle' (image 1) answer is unusable")
    assert "expected 0 or 1: no 0 or 1 in it" in message and "Looks pretty good to me" in message
    server.configure(garbage=False)
    before = server.stats()["requests"]
    with make(server, tmp_path) as rerun:  # the re-run asks only what is missing: the rest is in the cache
        assert rerun.composition(case, image) == scores and rerun.presence(case, 0, "the red circle", image) == first
        rerun.presence(case, 0, "the green triangle", image)
        assert rerun.usage()["cache_hits"] == 3
    assert server.stats()["requests"] == before + 1


def test_429_with_retry_after_then_success(server, tmp_path):
    server.configure(fail_429=2, retry_after="0.05")
    case = multi_case()
    with make(server, tmp_path, backoff_s=0.0) as judge:
        present, _ = judge.presence(case, 1, "the square", render_array(case.target))
        usage = judge.usage()
    assert server.stats()["requests"] == 3 and present in (0, 1)
    assert usage["retries"] == 2 and usage["answers"] == 1 and usage["requests"] == 3
    assert usage["backoff_s"] == pytest.approx(0.1)  # backoff 0 s, so each wait is the server's Retry-After


def test_500_is_retried_then_succeeds(server, tmp_path):
    server.configure(fail_500=2)
    case = multi_case()
    with make(server, tmp_path) as judge:
        pf, sc, _ = judge.composition(case, render_array(case.target))
        assert judge.usage()["retries"] == 2
    assert server.stats()["requests"] == 4 and server.stats()["answered"] == 2
    assert 0 <= pf <= 10 and 0 <= sc <= 10


@pytest.mark.parametrize("mode, said", [("fail_500", "HTTP 500"), ("fail_429", "HTTP 429")])
def test_persistent_failure_raises_naming_the_case(server, tmp_path, mode, said):
    server.configure(**{mode: 100, "retry_after": "0"})
    case = distinction_case()
    with make(server, tmp_path, max_retries=2) as judge, pytest.raises(RequestError) as err:
        judge.presence(case, 0, "the red circle", render_array(case.target))
    message = str(err.value)
    assert "case d1" in message and said in message and "3 attempts" in message and "'the red circle'" in message
    assert server.stats()["requests"] == 3
    assert len(AnswerCache(tmp_path / "cache")) == 0


def test_non_retryable_status_fails_at_once(server, tmp_path):
    case = multi_case()
    judge = make(server, tmp_path, base_url=server.base_url.removesuffix("/v1"))  # /chat/completions: 404
    with judge, pytest.raises(RequestError, match=r"case m1: .*HTTP 404.*not retried"):
        judge.presence(case, 0, "the person", render_array(case.target))
    assert server.stats()["requests"] == 0  # the stub counts completions only; the 404 came from routing


def test_timeout_is_retried_and_persistent_timeouts_fail(server, tmp_path):
    server.configure(stall=1, stall_s=2.0)
    case = multi_case()
    image = render_array(case.target)
    with make(server, tmp_path, timeout_s=0.5, max_retries=1) as judge:
        present, _ = judge.presence(case, 0, "the person", image)
        assert judge.usage()["retries"] == 1 and server.stats()["requests"] == 2
        server.configure(stall=10, stall_s=2.0)
        with pytest.raises(RequestError, match=r"case m1: .*2 attempts; last error: timed out after 0.5 s"):
            judge.presence(case, 1, "the square", image)


@pytest.mark.parametrize("protocol, problem", [("released", "no JSON object"), ("strict", "not JSON")])
def test_garbage_answer_is_a_clear_error_with_the_raw_text(server, tmp_path, protocol, problem):
    server.configure(garbage=True)
    case = distinction_case()
    with make(server, tmp_path, max_retries=1, protocol=protocol) as judge, pytest.raises(JudgeAnswerError) as err:
        judge.composition(case, render_array(case.target))
    message = str(err.value)
    assert message.startswith("case d1: the judge's")
    assert "Looks pretty good to me, I would say eight." in message and problem in message
    assert "after 2 attempts" in message
    assert server.stats()["requests"] == 4  # PF and SC, each asked twice
    assert len(AnswerCache(tmp_path / "cache")) == 0  # nothing unusable is cached


def test_cache_serves_a_rerun_and_repeats_ask_again(server, tmp_path):
    case = distinction_case()
    image = render_array(case.target)
    with make(server, tmp_path) as first:
        a1 = first.composition(case, image)
        a2 = first.composition(case, image)  # the protocol's second scoring: a fresh sample, not the cache
        assert server.stats()["requests"] == 4 and first.usage()["cache_hits"] == 0
    assert a1 == a2  # the stub is deterministic
    with make(server, tmp_path) as rerun:
        assert rerun.composition(case, image) == a1 and rerun.composition(case, image) == a2
        assert server.stats()["requests"] == 4  # unchanged: both scorings came from disk
        usage = rerun.usage()
        assert usage["cache_hits"] == 4 and usage["requests"] == 0 and usage["calls"]["prompt_following"] == 2
        other = image.copy()
        other[0, 0] = (1, 2, 3)
        rerun.composition(case, other)  # another image is another question
        assert server.stats()["requests"] == 6
    with make(server, tmp_path, cache=False) as uncached:
        uncached.composition(case, image)
        assert server.stats()["requests"] == 8


def test_cache_key_depends_on_model_prompt_and_image_bytes():
    red = "data:image/png;base64," + base64.b64encode(b"red").decode()
    blue = "data:image/png;base64," + base64.b64encode(b"blue").decode()
    m = chat_messages("score this", [("Generated image:", red)])
    d = request_digest("gpt-4.1", m, {})
    assert d == request_digest("gpt-4.1", chat_messages("score this", [("Generated image:", red)]), {})
    assert d != request_digest("gpt-4o", m, {})
    assert d != request_digest("gpt-4.1", chat_messages("score that", [("Generated image:", red)]), {})
    assert d != request_digest("gpt-4.1", chat_messages("score this", [("Generated image:", blue)]), {})
    assert d != request_digest("gpt-4.1", m, {"temperature": 0.0})
    assert answer_key(d, 0) != answer_key(d, 1)


def test_usage_sums_tokens_and_prices_them(server, tmp_path):
    server.configure(usage=(100, 20))
    case = distinction_case()
    image = render_array(case.target)
    with make(server, tmp_path, price_per_1k_input=0.01, price_per_1k_output=0.03) as judge:
        judge.composition(case, image)
        judge.presence(case, 0, "the red circle", image)
        u = judge.usage()
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (300, 60, 360)
    assert u["cost_usd"] == pytest.approx(0.3 * 0.01 + 0.06 * 0.03)
    assert u["calls"] == {"prompt_following": 1, "subject_consistency": 1, "presence": 1}
    # size-derived usage and a retried 500 (no usage field): the judge's sums are the server's
    server.configure(usage=None, fail_500=1)
    server.reset()
    with make(server, tmp_path, cache=False) as judge:
        judge.composition(case, image)
        u = judge.usage()
    s = server.stats()
    assert (u["prompt_tokens"], u["completion_tokens"]) == (s["prompt_tokens"], s["completion_tokens"]) != (0, 0)
    assert u["requests"] == s["requests"] == 3
    judge.write_usage(tmp_path / "usage.json")
    assert json.loads((tmp_path / "usage.json").read_text())["prompt_tokens"] == u["prompt_tokens"]


def test_requests_overlap_up_to_the_concurrency_through_the_runner(tmp_path):
    # the gate holds every request until 4 are in flight: a judge that serialised would sit at 1
    # (gate timeout) and one that ignored its semaphore would reach 8 (4 runner threads x PF + SC)
    base = [distinction_case(), multi_case()]
    cases = [dataclasses.replace(base[k % 2], key=f"c{k}") for k in range(12)]
    images = [render_array(c.target) for c in cases]
    with StubServer(gate=4, gate_timeout_s=3.0) as server:
        cfg = EvalConfig(judge="openai", rounds=1, scorings=1,
                         openai=OpenAIJudgeConfig(base_url=server.base_url, concurrency=4, cache_dir=str(tmp_path / "c")))
        judge = make_judge("openai", cfg)
        assert isinstance(judge, OpenAIJudge) and judge.concurrency == 4
        with judge:
            summary = evaluate_checkpoint(lambda ex, seed: images, cases, tmp_path, "m", cfg, judge)
        stats = server.stats()
    assert stats["max_in_flight"] == 4
    assert stats["requests"] == 6 * 4 + 6 * 2  # d1: PF, SC, 2 candidates; m1: PF, SC
    assert summary["judge"] == "openai" and summary["n_cases"] == 12
    lines = [json.loads(l) for l in (tmp_path / "m" / "score_try1" / "distinction_cross" / "score.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(len(l["DIS_pred"][0]) == 2 for l in lines)
    # which protocol produced the scores: in every line, the summary and the usage record
    assert all(l["judge_protocol"] == "released" for l in lines) and summary["judge_protocol"] == "released"
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["judge_protocol"] == "released"
    assert json.loads((tmp_path / "m" / "judge_usage.json").read_text())["protocol"] == "released"


def test_runner_line_from_the_openai_judge(server, tmp_path):
    case = distinction_case()
    with make(server, tmp_path) as judge:
        line = judge_case(judge, case, render_array(case.target), {"judge": judge.name})
    assert line["judge"] == "openai" and line["DIS_pred"][1] == [] and len(line["DIS_reasons"][0]) == 2
    assert 0 <= line["PF_score"] <= 10 and line["PF_score_reason"].startswith("stub score")


def test_presence_rejects_a_phrase_that_is_no_candidate(server, tmp_path):
    case = distinction_case()
    with make(server, tmp_path) as judge, pytest.raises(ValueError, match="case d1: 'the blue square' is not a candidate"):
        judge.presence(case, 0, "the blue square", render_array(case.target))
    assert server.stats()["requests"] == 0


def test_endpoint_and_key_rules(monkeypatch, tmp_path):
    loopback = OpenAIJudge(OpenAIJudgeConfig(base_url="http://127.0.0.1:9/v1", cache_dir=str(tmp_path)))
    assert isinstance(loopback.client, ChatClient) and loopback.client.api_key == LOOPBACK_PLACEHOLDER_KEY
    assert OpenAIJudge(OpenAIJudgeConfig(base_url="http://localhost:9/v1")).client.api_key == LOOPBACK_PLACEHOLDER_KEY
    with pytest.raises(EndpointConfigError, match="OPENAI_API_KEY"):
        OpenAIJudge(OpenAIJudgeConfig(base_url="https://vlm.example.com/v1"))
    with pytest.raises(EndpointConfigError, match="api.openai.com"):
        OpenAIJudge(OpenAIJudgeConfig())  # no base_url, no OPENAI_BASE_URL: the public API, which needs a key
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:10/v1")
    assert OpenAIJudge(OpenAIJudgeConfig()).base_url == "http://127.0.0.1:10/v1"
    assert OpenAIJudge(OpenAIJudgeConfig(base_url="http://127.0.0.1:11/v1")).base_url.endswith(":11/v1")  # params win
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert OpenAIJudge(OpenAIJudgeConfig(base_url="https://vlm.example.com/v1")).client.api_key == "sk-test"


def test_backoff_is_exponential_capped_jittered_and_floored_by_retry_after():
    assert [backoff_delay(a, 1.0, 30.0, None, 1.0) for a in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(2, 1.0, 30.0, None, 0.5) == 2.0
    assert backoff_delay(0, 1.0, 30.0, 12.0, 0.75) == 12.0  # the server asked for longer
    assert backoff_delay(4, 1.0, 30.0, 0.5, 1.0) == 16.0  # ... or for less: the backoff stands
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None and retry_after_s(None) is None
