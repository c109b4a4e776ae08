"""Register a checkpoint in MLflow (run + model version with metrics, params, data and code version), then gate it."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from tasks.checkpoints import data_dirs, is_srum, srum_index, stage_of
from tasks.paths import Paths
from tasks.stamps import file_md5

TAG_WEIGHTS_MD5 = "checkpoint.weights_md5"


def _already_registered(client, model_name: str, weights_md5: str):
    from registry.models import list_versions

    for mv in list_versions(client, model_name):
        if mv.tags.get(TAG_WEIGHTS_MD5) == weights_md5:
            return mv
    return None


def checkpoint_metrics(params, name: str) -> dict[str, float]:
    """SconeEval averages and per-task figures, compositional T2I accuracy and, for SRUM rounds, reward statistics."""
    from registry import SRUM_PREFIX, T2I_PREFIX, sconeeval_metrics

    paths = Paths.from_params(params)
    summary_path = paths.score_dir(name) / name / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} not found: run `scone eval checkpoint {name}` first")
    metrics = sconeeval_metrics(json.loads(summary_path.read_text()))
    t2i_path = paths.score_dir(name) / "t2i.json"
    if t2i_path.exists():
        t2i = json.loads(t2i_path.read_text())
        metrics[f"{T2I_PREFIX}mean"] = float(t2i["mean"])
        metrics.update({f"{T2I_PREFIX}{k}": float(v) for k, v in t2i["per_category"].items()})
    if is_srum(name):
        stats_path = paths.srum_round(srum_index(name)) / "summary.json"
        if stats_path.exists():
            stats = json.loads(stats_path.read_text()).get("reward_stats", {})
            metrics.update({f"{SRUM_PREFIX}{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))})
    return metrics


def register_step(params, name: str) -> dict:
    from registry.gate import apply_gate
    from registry.models import register_checkpoint
    from registry.tracking import Tracker, dvc_data_hash

    paths = Paths.from_params(params)
    ckpt = paths.checkpoint(name)
    weights = ckpt / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found: train checkpoint {name!r} first")
    metrics = checkpoint_metrics(params, name)
    tracker = Tracker(params.registry, Path("."))
    md5 = file_md5(weights)
    existing = _already_registered(tracker.client, params.registry.model_name, md5)
    if existing is not None:  # `dvc repro` after the pipeline: same weights, same version
        record = {"name": name, "version": existing.version, "run_id": existing.run_id,
                  "decision": existing.tags.get("gate.decision"), "reused": True}
    else:
        with tracker.run(name, data_hash=dvc_data_hash(data_dirs(params, name), Path("."))) as run_id:
            stage = stage_of(params, name)
            tracker.log_params(run_id, {"model": params.model.model_dump(), "train": params.train.model_dump(exclude={"stages"}),
                                        "stage": params.train.stages[stage].model_dump(), "eval": params.eval.model_dump(),
                                        **({"srum": params.srum.model_dump()} if is_srum(name) else {})})
            if (ckpt / "metrics.jsonl").exists():
                tracker.log_metrics_file(run_id, ckpt / "metrics.jsonl")
            tracker.set_tags(run_id, {TAG_WEIGHTS_MD5: md5})
            version = register_checkpoint(
                tracker, run_id, ckpt, params.registry.model_name, metrics,
                description=f"{name}: SconeEval Overall {metrics.get('sconeeval.overall', float('nan')):.3f}",
                eval_summary=paths.score_dir(name) / name / "summary.json",
            )
            tracker.client.set_model_version_tag(params.registry.model_name, version.version, TAG_WEIGHTS_MD5, md5)
            decision = apply_gate(tracker.client, params.registry.model_name, version.version, params.registry.gate)
        record = {"name": name, "version": version.version, "run_id": run_id, "decision": decision.decision,
                  "reasons": decision.reasons, "reused": False}
    record["metrics"] = metrics
    out = paths.metrics / "registry"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    return record


register_task = task(register_step, name="register", task_run_name="register-{name}")
