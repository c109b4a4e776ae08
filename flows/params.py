"""The root of params.yaml, for the CLI and the flows: defined in tasks/params.py (the steps and the benchmarks
annotate their `params` with it, and they sit below flows/), re-exported here."""
from __future__ import annotations

from tasks.params import Params, ParamsError, PipelineConfig, load_params, parse_overrides

__all__ = ["Params", "ParamsError", "PipelineConfig", "load_params", "parse_overrides"]
