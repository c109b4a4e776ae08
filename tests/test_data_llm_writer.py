"""LLM instruction writer against a local OpenAI-compatible server (127.0.0.1, started by the test), through the
project's one client (data.openai_client, the judges' too)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data.build import BASE, build_dataset
from data.config import DataConfig, DatasetSizes, LLMWriterConfig
from data.formats import scone_s2i
from data.instructions import InstructionPlan, Mention
from data.llm_writer import LLMWriterError, OpenAIWriter, build_prompt, check_instruction, normalise
from data.openai_cache import AnswerCache
from data.openai_client import ChatClient


class FakeLLM:
    """Answers 'place <clause> , <clause> <background>' from the prompt's lines; can fail or misbehave."""

    def __init__(self):
        self.requests = []
        self.fail_first = 0
        self.answer = None  # fixed (bad) answer instead of the composed one
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.lock = threading.Lock()

    def reply(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.requests.append(body)
            if self.fail_first:
                self.fail_first -= 1
                return 500, {"error": {"message": "overloaded", "type": "server_error"}}
        prompt = body["messages"][-1]["content"].splitlines()
        clauses = [line[2:] for line in prompt if line.startswith("- ")]
        background = next(line.split(": ", 1)[1] for line in prompt if line.startswith("Background:"))
        text = self.answer or "Place " + " , ".join(clauses) + f" {background}."
        return 200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


@pytest.fixture()
def server():
    fake = FakeLLM()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fake.lock:
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            time.sleep(fake.delay)  # lets concurrent requests overlap visibly
            status, payload = fake.reply(body)
            with fake.lock:
                fake.in_flight -= 1
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


PLAN = InstructionPlan(
    (Mention(1, "object", {"category": "circle", "colour": "red"}, "left"), Mention(2, "character", {"category": "person"}, "right")),
    "pair", "beach",
)


def llm(server, **kw) -> LLMWriterConfig:
    return LLMWriterConfig(base_url=server.url, model="tiny-llm", backoff_s=0.01, **kw)


def test_prompt_carries_only_the_phrases_and_the_answer_is_validated_and_cached(server, tmp_path):
    prompt = build_prompt(PLAN)
    assert "- the red circle from image 1 on the left" in prompt and "Background: at the beach" in prompt
    writer = OpenAIWriter(llm(server), tmp_path / "cache")
    text = writer.write(PLAN)
    assert text == "place the red circle from image 1 on the left , the person from image 2 on the right at the beach"
    assert server.requests[0]["model"] == "tiny-llm"
    assert writer.write(PLAN) == text and len(server.requests) == 1  # one answer per prompt, even asked twice
    again = OpenAIWriter(llm(server), tmp_path / "cache")
    assert again.write(PLAN) == text and len(server.requests) == 1  # answered from the disk cache
    assert isinstance(writer.client, ChatClient) and again.client.usage()["cache_hits"] == 1
    (entry,) = [json.loads(f.read_text()) for f in (tmp_path / "cache").glob("??/*.json")]  # the client's cache layout
    assert entry["model"] == "tiny-llm" and entry["kind"] == "instruction" and normalise(entry["answer"]) == text
    other_model = OpenAIWriter(llm(server).model_copy(update={"model": "other"}), tmp_path / "cache")
    assert other_model.write(PLAN) == text and len(server.requests) == 2  # another model: another question


def test_transient_errors_are_retried_with_backoff(server, tmp_path):
    server.fail_first = 2
    writer = OpenAIWriter(llm(server, max_retries=2), tmp_path)
    assert writer.write(PLAN).startswith("place the red circle")
    assert len(server.requests) == 3
    u = writer.client.usage()  # the shared client's retries: the judge's backoff and accounting
    assert (u["retries"], u["requests"], u["answers"]) == (2, 3, 1) and u["backoff_s"] > 0
    server.fail_first = 5
    with pytest.raises(LLMWriterError, match=r"data.llm: instruction for the red circle, the person request to "
                                              r"http://127.0.0.1:\d+/v1 \(model tiny-llm\) failed after 2 attempts; "
                                              r"last error: HTTP 500"):
        OpenAIWriter(llm(server, max_retries=1), tmp_path / "other").write(PLAN)


def test_a_public_endpoint_without_a_key_is_refused_when_the_writer_is_built(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_LLM_KEY", raising=False)
    with pytest.raises(LLMWriterError, match="needs an API key: set MY_LLM_KEY.*data.instruction_writer=template"):
        OpenAIWriter(LLMWriterConfig(base_url="https://llm.example.com/v1", api_key_env="MY_LLM_KEY"), tmp_path)
    monkeypatch.setenv("MY_LLM_KEY", "sk-test")
    writer = OpenAIWriter(LLMWriterConfig(base_url="https://llm.example.com/v1", api_key_env="MY_LLM_KEY"), tmp_path)
    assert writer.client.api_key == "sk-test"


@pytest.mark.parametrize(
    "answer, problem",
    [
        ("   ", "empty answer"),
        ("place the circle from image 1 and the person from image 2", "phrase 'the red circle' missing"),
        ("place the red circle from image 1 and the person from image 2 and a blue square", "subject words not in the given phrases: ['blue', 'square']"),
        ("place the red circle from image 1 beside the person from image 2", "words outside the vocabulary: ['beside']"),
    ],
)
def test_bad_answers_raise_instead_of_falling_back(server, tmp_path, answer, problem):
    server.answer = answer
    with pytest.raises(LLMWriterError, match=re_escape(problem)) as err:
        OpenAIWriter(llm(server, max_retries=1), tmp_path).write(PLAN)
    assert "(after 2 attempts)" in str(err.value) and len(server.requests) == 2  # asked again, like a failed request
    assert len(AnswerCache(tmp_path)) == 0  # nothing cached


def re_escape(s):
    import re

    return re.escape(s)


def test_check_instruction_accepts_the_template_wording():
    from data.instructions import TemplateWriter

    assert check_instruction(TemplateWriter().write(PLAN), PLAN) == []


def test_build_with_the_openai_writer_rewrites_every_instruction_concurrently(server, tmp_path):
    cfg = DataConfig(root=str(tmp_path / "data"), rows_per_row_group=8, num_workers=1, sizes=DatasetSizes(base=12),
                     instruction_writer="openai", llm=llm(server, max_concurrency=3))
    server.delay = 0.05
    summary = build_dataset(BASE, cfg)
    assert summary["rows"] == 12 and summary["quarantined"] == 0
    cases = scone_s2i.read_cases(cfg.root, BASE)
    assert all(c.instruction.startswith("place ") and c.meta["instruction_writer"] == "openai:tiny-llm" for c in cases)
    assert all(m in c.instruction for c in cases for m in (p[0] for p in c.subject_list if p))
    assert 1 < server.max_in_flight <= 3
    # the drawn cases are those of the template build: only the instruction text differs
    plain = DataConfig(root=str(tmp_path / "plain"), rows_per_row_group=8, num_workers=1, sizes=DatasetSizes(base=12))
    build_dataset(BASE, plain)
    assert [c.instruction for c in scone_s2i.read_cases(plain.root, BASE)] == [c.meta["template_instruction"] for c in cases]
    assert (tmp_path / "cache" / "llm_instructions").is_dir()
