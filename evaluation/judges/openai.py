"""The `openai` judge: SconeEval scores from any OpenAI-compatible VLM endpoint.

Per case, as the protocol asks (Scone Sec. 4.3): `composition` sends two requests at once, prompt following
and subject consistency (0-10 each, with a rationale), both showing the input images and the generated one;
`presence` sends one request per candidate (the reference image and the generated one).

What the requests say, which images they carry and which answers are accepted is the judge protocol,
`eval.openai.protocol`:
- `released` (default): the released SconeEval / OmniContext scoring's (evaluation.judges.released): one user
  message, the instruction alone names the targets, JPEG, inputs capped near 1024 x 1024 pixels, the
  generated image at its own size. Comparable with the published leaderboard.
- `strict`: ours (evaluation.judges.prompts): a system message, labelled images at `image_size` with
  nearest-neighbour resampling, and the ground-truth target and distractor subjects named to the judge.
The protocol is `judge.protocol`; the runner writes it into every score line and the summary.

Everything about the endpoint (retries, backoff, the answer cache, bounded concurrency, usage and cost) is
the project's one client, data.openai_client.ChatClient (`judge.client`); the SRUM reward judge
(evaluation.judges.rewards) sends its requests through the same judge, so it shares all of that. A malformed
answer is retried by the client, then raised as `JudgeAnswerError` naming the case and showing the answer
(a failed request: data.openai_client.RequestError; an endpoint without a key: EndpointConfigError);
the answers that did parse, for this case and every earlier one, are in the cache, so a re-run after fixing
the endpoint asks only what is missing.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel

from data.openai_client import ChatClient, Request
from evaluation.config import OpenAIJudgeConfig
from evaluation.judges import prompts, released
from evaluation.judges.prompts import PresenceAnswer, ScoreAnswer

JPEG_QUALITY = 75  # PIL's default, what a plain save(format="JPEG") writes


# ---------------------------------------------------------------------------------------- images


def image_data_url(image, size: int) -> str:
    """PNG data URL of an RGB image, its longer side brought to `size` with nearest-neighbour
    resampling (pixel-exact blocks; 0 keeps the size)."""
    from evaluation.detect import to_array

    img = Image.fromarray(to_array(image))
    if size and max(img.size) != size:
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast: the bytes are small either way
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_messages(text: str, images: list[tuple[str, str]]) -> list[dict]:
    """The strict protocol's messages: system + one user message, the request text, then each image after its label."""
    content: list[dict] = [{"type": "text", "text": text}]
    for label, url in images:
        content.append({"type": "text", "text": label})
        content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "system", "content": prompts.SYSTEM}, {"role": "user", "content": content}]


def json_request(case_key: str, kind: str, what: str, messages: list[dict], schema: type[BaseModel]) -> Request:
    """A request whose answer must be one JSON object of `schema` (prompts.parse_answer)."""
    return Request(f"case {case_key}", kind, what, messages,
                   partial(prompts.parse_answer, schema=schema, case_key=case_key, what=what))


# ---------------------------------------------------------------------------------------- the judge


class OpenAIJudge:
    name = "openai"
    deterministic = False

    def __init__(self, cfg: OpenAIJudgeConfig | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, cache_dir: str | Path | None = None, seed: int | None = None):
        self.cfg = cfg or OpenAIJudgeConfig()
        self.protocol = self.cfg.protocol
        self.client = ChatClient(self.cfg, base_url=base_url, api_key=api_key, cache_dir=cache_dir, seed=seed)
        self._images: OrderedDict[tuple, Any] = OrderedDict()
        self._images_lock = threading.Lock()

    @classmethod
    def from_config(cls, eval_cfg=None, checkpoint_dir=None, **kwargs) -> "OpenAIJudge":
        """From EvalConfig (reads `eval_cfg.openai`); `checkpoint_dir` is accepted and unused, so one
        make_judge call can serve every backend."""
        return cls(getattr(eval_cfg, "openai", None), **kwargs)

    @property
    def concurrency(self) -> int:
        return self.cfg.concurrency

    @property
    def model(self) -> str:
        return self.client.model

    @property
    def base_url(self) -> str:
        return self.client.base_url

    # ------------------------------------------------------------------ the judge protocol

    def composition(self, case, image) -> tuple[float, float, tuple[str, str]]:
        if self.protocol == "released":
            urls = self._references(case) + [self._output(image)]
            pf_text, sc_text = released.prompt_following(case), released.subject_consistency(case)
            pf_msgs, sc_msgs = released.messages(pf_text, urls), released.messages(sc_text, urls)
            parse = released.parse_score
        else:
            shown = self._references(case) + [("Generated image:", self.image_url(image))]
            pf_msgs = chat_messages(prompts.prompt_following(case), shown)
            sc_msgs = chat_messages(prompts.subject_consistency(case), shown)
            parse = partial(prompts.parse_answer, schema=ScoreAnswer)
        pf, sc = self.ask([
            self._request(case, "prompt_following", "prompt following", pf_msgs, parse),
            self._request(case, "subject_consistency", "subject consistency", sc_msgs, parse),
        ])
        return float(pf.score), float(sc.score), (pf.reason, sc.reason)

    def presence(self, case, ref_index: int, phrase: str, image) -> tuple[int, str]:
        refs = self._references(case)
        if not 0 <= ref_index < len(refs):
            raise IndexError(f"case {case.key}: reference index {ref_index} out of range ({len(refs)} input images)")
        if phrase not in case.subject_list[ref_index]:
            raise ValueError(f"case {case.key}: {phrase!r} is not a candidate of image {ref_index + 1} ({case.subject_list[ref_index]})")
        what = f"presence of {phrase!r} (image {ref_index + 1})"
        if self.protocol == "released":
            msgs = released.messages(released.presence(phrase), [refs[ref_index], self._output(image)])
            parse = released.parse_presence
        else:
            shown = [("Reference image:", refs[ref_index][1]), ("Target image:", self.image_url(image))]
            msgs = chat_messages(prompts.presence(case, ref_index, phrase), shown)
            parse = partial(prompts.parse_answer, schema=PresenceAnswer)
        (answer,) = self.ask([self._request(case, "presence", what, msgs, parse)])
        return int(answer.present), answer.reason

    @staticmethod
    def _request(case, kind: str, what: str, messages: list[dict], parse) -> Request:
        return Request(f"case {case.key}", kind, what, messages, partial(parse, case_key=case.key, what=what))

    def ask(self, requests: list[Request]) -> list[Any]:
        """Parsed answers to `requests` through the client (cache, retries, concurrency, usage)."""
        return self.client.ask(requests)

    # ------------------------------------------------------------------ accounting

    def usage(self) -> dict:
        """Counters and cost of this judge so far (JSON-ready), with the protocol that asked."""
        return {**self.client.usage(), "protocol": self.protocol}

    def write_usage(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.usage(), indent=2, sort_keys=True) + "\n")
        return path

    # ------------------------------------------------------------------ images

    def _remember(self, key: tuple, make):
        """A small LRU of encoded images: a case's images are sent with each of its requests."""
        with self._images_lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        value = make()
        with self._images_lock:
            self._images[key] = value
            while len(self._images) > 512:
                self._images.popitem(last=False)
        return value

    def _references(self, case) -> list:
        """The case's input images as the protocol sends them: data URLs (released), (label, data URL) (strict)."""
        from evaluation.runner import reference_images

        paths = tuple((getattr(case, "meta", None) or {}).get("input_images") or ())
        key = (self.protocol, "refs", paths) if paths else (self.protocol, "refs", case.key, repr(case.references))
        if self.protocol == "released":
            return self._remember(key, lambda: [jpeg_data_url(released.prepare_input(im))
                                                for im in reference_images(case)])
        return self._remember(key, lambda: [(f"Input image {i + 1}:", image_data_url(im, self.cfg.image_size))
                                            for i, im in enumerate(reference_images(case))])

    def _output(self, image) -> str:
        """The released protocol's generated image: JPEG at its own size."""
        from evaluation.detect import to_array

        arr = to_array(image)
        key = ("jpeg", arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
        return self._remember(key, lambda: jpeg_data_url(Image.fromarray(arr)))

    def image_url(self, image) -> str:
        """PNG data URL at `image_size` (the strict protocol's images; the SRUM reward judge's)."""
        from evaluation.detect import to_array

        arr = to_array(image)
        key = ("png", arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
        return self._remember(key, lambda: image_data_url(arr, self.cfg.image_size))

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the client's HTTP connection and loop thread (they restart if the judge is used again)."""
        self.client.close()

    def __enter__(self) -> "OpenAIJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
