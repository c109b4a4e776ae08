"""Judges: who scores a generated image, for SconeEval and for SRUM's rewards. One family of three backends
(`oracle`, `openai`, `self`) answering two protocols, over one detection and matching module
(evaluation.detect, with the thresholds every backend reads: PRESENCE_FRACTION, the silhouette ramp) and one
OpenAI-compatible client (data.openai_client: retries, cache, concurrency, usage).

SconeEval (Scone Sec. 4.3), `make_judge(kind)`:

- `composition(case, image) -> (pf, sc, reason)`: prompt following and subject consistency, 0-10.
  `reason` is one string, or a (pf_reason, sc_reason) pair when the backend reasons about each score
  separately (the VLM prompts of the paper ask for PF and SC in two calls).
- `presence(case, ref_index, phrase, image) -> (0 | 1, reason)`: does the candidate subject described
  by `phrase` (an entry of `case.subject_list[ref_index]`) from reference image `ref_index` appear in
  the output? Asked for every candidate of every reference on the distinction task types.

`name` labels result files; `deterministic` tells the runner that repeating a scoring gives the same
answer (the oracle), so it may score once and reuse the result for every scoring of the protocol;
`protocol` (the openai judge: `released` or `strict`, eval.openai.protocol) is written beside the scores.

SRUM rewards (SRUM Sec. 3.2), `evaluation.judges.rewards.make_reward_judge(kind)`: `judge(row, image, regions)
-> (global layout judgment, one judgment per region)`, scores in [-1, 1]; the oracle's from the same pixel
analysis, the self one's from the same understanding expert, the openai one's through an OpenAIJudge.

Backends: `oracle` (pixels against the world's ground truth, evaluation.judges.oracle), `openai` (any
OpenAI-compatible VLM endpoint, evaluation.judges.openai, its protocols in evaluation.judges.released and
evaluation.judges.prompts) and `self` (the model's own understanding expert, evaluation.judges.self).
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import numpy as np

Reason = str | tuple[str, str]


@runtime_checkable
class Judge(Protocol):
    name: str
    deterministic: bool

    def composition(self, case: Any, image: np.ndarray) -> tuple[float, float, Reason]: ...

    def presence(self, case: Any, ref_index: int, phrase: str, image: np.ndarray) -> tuple[int, str]: ...


# kind -> (module, factory attribute)
BACKENDS = {
    "oracle": ("evaluation.judges.oracle", "OracleJudge"),
    "openai": ("evaluation.judges.openai", "OpenAIJudge"),
    "self": ("evaluation.judges.self", "SelfJudge"),
}


def make_judge(kind: str, eval_cfg=None, **kwargs) -> Judge:
    """The judge backend `kind` ('oracle' | 'openai' | 'self').

    Backends are built as `Factory.from_config(eval_cfg, **kwargs)` when they offer it (the openai
    judge reads `eval_cfg.openai`; the self judge takes `pipeline=` or `checkpoint_dir=`), else
    `Factory(**kwargs)`."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown judge {kind!r}; expected one of {sorted(BACKENDS)} (eval.judge in params.yaml)")
    module_name, attr = BACKENDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ValueError(
            f"judge {kind!r} is not available in this installation ({module_name} is missing); "
            f"use eval.judge=oracle"
        ) from None
    factory = getattr(module, attr)
    if eval_cfg is not None and hasattr(factory, "from_config"):
        return factory.from_config(eval_cfg, **kwargs)
    return factory(**kwargs)
