"""Configuration owned by the registry package (the `registry:` section of params.yaml)."""
from __future__ import annotations

from pydantic import Field

from data.config import Strict


class BenchmarkGate(Strict):
    """Optional rules on one more benchmark's headline score (MICo-Bench: `mico.overall`, Weighted-Ref-VIEScore
    0-100; MIGE-Bench: `mige.overall`, 0-10). null turns a rule off."""

    min_score: float | None = Field(None, ge=0, description="the candidate's headline score must reach this")
    max_regression: float | None = Field(None, ge=0, description="allowed drop of the headline score versus the "
                                         "current champion (0: no drop at all)")


class GateConfig(Strict):
    """Promotion thresholds on SconeEval averages (0-10 scale) and the no-regression rule; optional rules per
    further benchmark (off by default: the decisions stay SconeEval's)."""

    min_overall: float = Field(0.5, ge=0, le=10)
    min_com: float = Field(0.0, ge=0, le=10)
    min_dis: float = Field(0.0, ge=0, le=10)
    max_regression: float = Field(0.0, ge=0, description="allowed drop in Overall versus the current champion")
    mico: BenchmarkGate = Field(BenchmarkGate(), description="rules on MICo-Bench Overall (0-100)")
    mige: BenchmarkGate = Field(BenchmarkGate(), description="rules on MIGE-Bench Overall (0-10)")


class RegistryConfig(Strict):
    tracking_uri: str = Field("sqlite:///artifacts/mlflow.db", description="MLFLOW_TRACKING_URI overrides")
    artifact_location: str = Field(
        "artifacts/mlruns",
        description="run artifacts of a new experiment (relative to the repo root); ignored for http(s) tracking servers",
    )
    experiment: str = "scone-ops"
    model_name: str = "scone-tiny"
    gate: GateConfig = GateConfig()
