"""Configuration owned by the registry package (the `registry:` section of params.yaml)."""
from __future__ import annotations

from pydantic import Field

from data.config import Strict


class GateConfig(Strict):
    """Promotion thresholds on SconeEval averages (0-10 scale) and the no-regression rule."""

    min_overall: float = Field(0.5, ge=0, le=10)
    min_com: float = Field(0.0, ge=0, le=10)
    min_dis: float = Field(0.0, ge=0, le=10)
    max_regression: float = Field(0.0, ge=0, description="allowed drop in Overall versus the current champion")


class RegistryConfig(Strict):
    tracking_uri: str = Field("sqlite:///artifacts/mlflow.db", description="MLFLOW_TRACKING_URI overrides")
    artifact_location: str = Field(
        "artifacts/mlruns",
        description="run artifacts of a new experiment (relative to the repo root); ignored for http(s) tracking servers",
    )
    experiment: str = "scone-ops"
    model_name: str = "scone-tiny"
    gate: GateConfig = GateConfig()
