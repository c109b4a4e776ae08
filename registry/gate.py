"""The promotion gate: a candidate becomes `champion` only if it clears the SconeEval thresholds and does not
regress the current champion's Overall score by more than `max_regression`; and, where params set them, if it
clears each further benchmark's threshold (`registry.gate.mico.min_score` on `mico.overall`, `...mige...` on
`mige.overall`) and does not regress that benchmark's headline by more than its `max_regression`.

`decide` is the rule, pure; `apply_gate` reads the registry, applies the rule and records the outcome on the
candidate version (tags + description), moving the alias only on promotion.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from mlflow import MlflowClient

from registry import (CHAMPION_ALIAS, MICO_OVERALL, MIGE_OVERALL, SCONEEVAL_COM, SCONEEVAL_DIS,  # noqa: F401
                      SCONEEVAL_OVERALL, TAG_CHAMPION_BEFORE, TAG_DECISION, TAG_REASONS, TAG_THRESHOLDS)
from registry.config import BenchmarkGate, GateConfig
from registry.models import version_by_alias, version_metrics
PROMOTED, REJECTED = "promoted", "rejected"
# Guards float noise in averages (e.g. 6.97 stored as 6.969999...) from flipping an equal score into a regression.
_EPS = 1e-9


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str]
    model_name: str | None = None
    version: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    candidate_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def decision(self) -> str:
        return PROMOTED if self.promote else REJECTED

    def to_dict(self) -> dict:
        return {"decision": self.decision, **asdict(self)}


def decide(candidate_metrics: Mapping[str, float], champion_metrics: Mapping[str, float] | None,
           gate: GateConfig) -> GateDecision:
    """Every check is reported, as `pass: ...` or `fail: ...`; promotion needs all of them to pass."""
    reasons: list[str] = []
    ok = True
    for key, threshold_name in ((SCONEEVAL_OVERALL, "min_overall"), (SCONEEVAL_COM, "min_com"), (SCONEEVAL_DIS, "min_dis")):
        threshold = getattr(gate, threshold_name)
        value = candidate_metrics.get(key)
        if value is None:
            ok = False
            reasons.append(f"fail: {key} missing from the candidate's metrics ({threshold_name} {threshold:g} cannot be checked)")
        elif value + _EPS < threshold:
            ok = False
            reasons.append(f"fail: {key} {value:.4f} < {threshold_name} {threshold:g}")
        else:
            reasons.append(f"pass: {key} {value:.4f} >= {threshold_name} {threshold:g}")

    overall = candidate_metrics.get(SCONEEVAL_OVERALL)
    if champion_metrics is None:
        reasons.append("pass: no champion yet")
    elif champion_metrics.get(SCONEEVAL_OVERALL) is None:
        reasons.append(f"pass: the champion has no {SCONEEVAL_OVERALL}; no regression check possible")
    elif overall is not None:
        floor = champion_metrics[SCONEEVAL_OVERALL] - gate.max_regression
        verdict = f"{SCONEEVAL_OVERALL} {overall:.4f} vs champion {champion_metrics[SCONEEVAL_OVERALL]:.4f} " \
                  f"(max_regression {gate.max_regression:g})"
        if overall + _EPS < floor:
            ok = False
            reasons.append(f"fail: regression: {verdict}")
        else:
            reasons.append(f"pass: no regression: {verdict}")
    for key, rules in ((MICO_OVERALL, gate.mico), (MIGE_OVERALL, gate.mige)):
        ok = _benchmark_rules(key, rules, candidate_metrics, champion_metrics, reasons) and ok
    return GateDecision(promote=ok, reasons=reasons, candidate_metrics=dict(candidate_metrics))


def _benchmark_rules(key: str, rules: BenchmarkGate, candidate: Mapping[str, float],
                     champion: Mapping[str, float] | None, reasons: list[str]) -> bool:
    """A further benchmark's threshold and no-regression rule on its headline `key` (each only when set)."""
    ok = True
    value = candidate.get(key)
    if rules.min_score is not None:
        if value is None:
            ok = False
            reasons.append(f"fail: {key} missing from the candidate's metrics (min_score {rules.min_score:g} cannot be checked)")
        elif value + _EPS < rules.min_score:
            ok = False
            reasons.append(f"fail: {key} {value:.4f} < min_score {rules.min_score:g}")
        else:
            reasons.append(f"pass: {key} {value:.4f} >= min_score {rules.min_score:g}")
    if rules.max_regression is not None:
        if champion is None:
            reasons.append(f"pass: no champion yet ({key})")
        elif champion.get(key) is None:
            reasons.append(f"pass: the champion has no {key}; no regression check possible")
        elif value is None:
            ok = False
            reasons.append(f"fail: {key} missing from the candidate's metrics (its regression cannot be checked)")
        else:
            verdict = f"{key} {value:.4f} vs champion {champion[key]:.4f} (max_regression {rules.max_regression:g})"
            if value + _EPS < champion[key] - rules.max_regression:
                ok = False
                reasons.append(f"fail: regression: {verdict}")
            else:
                reasons.append(f"pass: no regression: {verdict}")
    return ok


def apply_gate(client: MlflowClient, model_name: str, version: str | int, gate: GateConfig) -> GateDecision:
    """Decide on `version` against the current champion, move `champion` on promotion, record the decision."""
    version = str(version)
    candidate = client.get_model_version(model_name, version)
    champion = version_by_alias(client, model_name, CHAMPION_ALIAS)
    champion_metrics = version_metrics(client, champion) if champion is not None else None
    result = decide(version_metrics(client, candidate), champion_metrics, gate)
    result.model_name, result.version = model_name, version
    result.champion_before = str(champion.version) if champion is not None else None
    result.champion_after = version if result.promote else result.champion_before
    if result.promote:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)

    tags = {
        TAG_DECISION: result.decision,
        TAG_REASONS: json.dumps(result.reasons),
        TAG_CHAMPION_BEFORE: result.champion_before or "none",
        TAG_THRESHOLDS: json.dumps(gate.model_dump()),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    note = f"Gate: {result.decision} (champion before: {tags[TAG_CHAMPION_BEFORE]}).\n" + "\n".join(
        f"- {r}" for r in result.reasons)
    # re-gating a version replaces its previous verdict instead of stacking them
    base = re.split(r"(?:^|\n\n)Gate: ", candidate.description or "", maxsplit=1)[0].rstrip()
    description = f"{base}\n\n{note}" if base else note
    client.update_model_version(model_name, version, description=description)
    return result
