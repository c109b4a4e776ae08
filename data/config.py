"""Configuration owned by the data package (the `data:` section of params.yaml)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSizes(Strict):
    base: int = Field(192, ge=1, description="single-candidate base pool (Stage I step 1)")
    multi_candidate: int = Field(128, ge=1, description="multi-candidate rows (Stage II)")
    bench_per_task: int = Field(4, ge=1, description="SconeEval-layout held-out cases per task type (6 types)")
    srum_prompts: int = Field(24, ge=1, description="compositional prompts for SRUM rounds")
    mico: int = Field(54, ge=1, description="MICo-150K-style rows, spread evenly over its composition types and De&Re")
    mige_edit: int = Field(32, ge=1, description="MIGE-style subject addition / replacement rows (half each)")
    t2i_pretrain: int = Field(384, ge=1, description="text-to-image rows (no references) over the seven T2I categories")
    und_pretrain: int = Field(2048, ge=1, description="understanding rows: images of the training combinations with "
                              "questions about them (data.understanding)")
    und_heldout: int = Field(48, ge=1, description="held-out understanding images (held-out combinations), every "
                             "question type asked of each: the per-checkpoint understanding score")
    mico_bench_per_task: int = Field(1, ge=1, description="held-out MICo-Bench-layout cases per MICo sub-task (7) "
                                     "and De&Re (data.heldout)")
    mige_bench_per_edit: int = Field(4, ge=1, description="held-out MIGE-Bench-layout cases per edit type "
                                     "(subject addition, replacement)")


class QualityConfig(Strict):
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    refined_keep_score: int = Field(4, ge=0, le=4, description="refined subset keeps rows the judge scores >= this (0-4 scale)")


class LLMWriterConfig(Strict):
    """OpenAI-compatible chat endpoint for `instruction_writer: openai` (Scone step 2 written by an LLM)."""

    model: str = "gpt-4o-mini"
    base_url: str | None = Field(None, description="endpoint; None reads OPENAI_BASE_URL")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key")
    max_concurrency: int = Field(4, ge=1, le=64)
    max_retries: int = Field(4, ge=0, le=20)
    backoff_s: float = Field(0.5, ge=0.0, description="first retry delay; doubles each retry")
    timeout_s: float = Field(60.0, gt=0.0)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    cache_dir: str | None = Field(None, description="on-disk answer cache; None: <root>/../cache/llm_instructions")


class DataConfig(Strict):
    seed: int = 1234
    image_size: int = Field(32, ge=16, le=1024, description="rendered image side in pixels")
    root: str = "artifacts/data"
    rows_per_row_group: int = Field(32, ge=1)
    row_groups_per_file: int = Field(4, ge=1, description="row groups per parquet file (Scone-S2I shards hold several)")
    defect_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="share of base rows whose target is spoilt like a noisy generated pool"
    )
    max_references: int = Field(4, ge=1, le=5, description="5 lets MICo's five-input types (5O, 1P4C, 1P2C2O) build")
    mico_max_references: int = Field(5, ge=2, le=5, description="MICo's own input limit: its largest types "
                                     "(5O, 1P4C, 1P2C2O) take 5 images; train on them with model.max_references 5")
    instruction_writer: Literal["template", "openai"] = "template"
    num_workers: int = Field(0, ge=0, description="processes rendering rows; 0 = all cores (output is identical for any value)")
    llm: LLMWriterConfig = LLMWriterConfig()
    sizes: DatasetSizes = DatasetSizes()
    quality: QualityConfig = QualityConfig()
