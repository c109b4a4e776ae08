"""Configuration owned by the evaluation package (the `eval:` section of params.yaml)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from data.config import Strict


class SamplingConfig(Strict):
    steps: int = Field(16, ge=1, description="Euler steps of the rectified-flow ODE")
    cfg_text: float = Field(3.0, ge=1.0, description="text classifier-free guidance scale")
    cfg_image: float = Field(1.5, ge=1.0, description="image classifier-free guidance scale")
    batch_size: int = Field(32, ge=1)
    semantic_mask: bool = Field(
        False, description="sample with the understanding bridge's semantic mask (checkpoints from the stage that "
        "formed it on). Off, as the released Scone inference runs; the mask is a training device (Stage II step 1)")


class OpenAIJudgeConfig(Strict):
    """The `openai` judge (evaluation.judges.openai); the API key comes from OPENAI_API_KEY."""

    model: str = "gpt-4.1"
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint; OPENAI_BASE_URL overrides when null")
    concurrency: int = Field(16, ge=1, description="requests in flight at once")
    max_retries: int = Field(5, ge=0, description="retries of a request (429, 5xx, timeout, malformed answer) before failing")
    timeout_s: float = Field(60.0, gt=0)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry, jittered; Retry-After wins when longer")
    backoff_max_s: float = Field(30.0, ge=0, description="cap of the exponential retry delay")
    temperature: float | None = Field(None, ge=0, le=2, description="null: the endpoint's default (repeated scorings sample the judge)")
    image_size: int = Field(256, ge=0, description="side the images are sent at (nearest-neighbour upscaling of the tiny renders); 0: as they are")
    cache: bool = Field(True, description="answers are cached on disk under cache_dir")
    cache_dir: str = "artifacts/cache/judge"
    price_per_1k_input: float = 0.002
    price_per_1k_output: float = 0.008


class OracleConfig(Strict):
    """Thresholds of the oracle judge (evaluation.judges.oracle documents every rule)."""

    full_dist: float = Field(30.0, gt=0, description="RGB distance within which a pixel fully belongs to a palette colour")
    zero_dist: float = Field(80.0, gt=0, description="RGB distance beyond which it does not belong at all")
    presence_fraction: float = Field(0.3, gt=0, le=1, description="a blob counts as a subject at this share of its expected area")
    position_iou_full: float = Field(0.8, gt=0, le=1, description="bbox IoU that earns full position credit in PF")


class EvalConfig(Strict):
    judge: Literal["oracle", "openai", "self"] = "oracle"
    rounds: int = Field(3, ge=1, description="sampling rounds (seeds) per checkpoint, as the Scone protocol")
    scorings: int = Field(3, ge=1, description="scorings per round; a deterministic judge repeats identically")
    seed: int = 0
    sampling: SamplingConfig = SamplingConfig()
    openai: OpenAIJudgeConfig = OpenAIJudgeConfig()
    oracle: OracleConfig = OracleConfig()
    scores_root: str = "artifacts/scores"
