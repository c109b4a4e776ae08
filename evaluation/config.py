"""Configuration owned by the evaluation package (the `eval:` section of params.yaml)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from data.config import Strict
from data.openai_client import EndpointConfig
from evaluation.detect import PRESENCE_FRACTION


class SamplingConfig(Strict):
    steps: int = Field(16, ge=1, description="Euler steps of the rectified-flow ODE")
    cfg_text: float = Field(3.0, ge=1.0, description="text classifier-free guidance scale")
    cfg_image: float = Field(1.5, ge=1.0, description="image classifier-free guidance scale")
    batch_size: int = Field(32, ge=1)
    semantic_mask: bool = Field(
        False, description="sample with the understanding bridge's semantic mask (checkpoints from the stage that "
        "formed it on). Off, as the released Scone inference runs; the mask is a training device (Stage II step 1)")


class OpenAIJudgeConfig(EndpointConfig):
    """The `openai` judge (evaluation.judges.openai) on the one client (data.openai_client); the API key comes from
    OPENAI_API_KEY. Also the endpoint of the SRUM reward judge (`srum.judge: openai`)."""

    protocol: Literal["released", "strict"] = Field(
        "released", description="released: SconeEval's judge protocol as its released scoring runs it (one user "
        "message, the instruction alone names the targets, JPEG, inputs capped at 1024x1024 pixels, the output at its "
        "own size), comparable with the published leaderboard; strict: ours, which also shows the judge the ground-"
        "truth target and distractor subjects (docs/judges.md)")
    image_size: int = Field(256, ge=0, description="strict protocol and SRUM rewards: side the images are sent at "
                            "(nearest-neighbour upscaling of the tiny renders); 0: as they are")
    cache_dir: str = "artifacts/cache/judge"
    price_per_1k_input: float = Field(0.002, ge=0)
    price_per_1k_output: float = Field(0.008, ge=0)


class OracleConfig(Strict):
    """Thresholds of the oracle judge (evaluation.judges.oracle documents every rule)."""

    full_dist: float = Field(30.0, gt=0, description="RGB distance within which a pixel fully belongs to a palette colour")
    zero_dist: float = Field(80.0, gt=0, description="RGB distance beyond which it does not belong at all")
    presence_fraction: float = Field(PRESENCE_FRACTION, gt=0, le=1, description="a blob counts as a subject at this "
                                     "share of its expected area (default: evaluation.detect.PRESENCE_FRACTION)")
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
