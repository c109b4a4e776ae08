"""Register a checkpoint in MLflow, then gate it.

The run holds everything measured: params, the training curves (metrics.jsonl) and a loss plot, the evaluation
scores and summary, the datasets as `mlflow.data` inputs (DVC digests), MLflow's source tags. The version is an
MLflow model (pyfunc over the generation pipeline, registry.models) with a short list of tags: stage, code and
data version, weights md5, headline scores, gate verdict.

Idempotent: weights that are already registered keep their version. When their scores were recomputed (an
evaluation code or settings change), the version gets the new metrics and is gated again, so the registry shows
what the current code measures. Concurrent registers are serialised by the artifacts lock (tasks.lock).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from registry.tracking import file_md5
from tasks.atomic import staged, write_json
from tasks.checkpoints import data_dirs, is_srum, srum_index, stage_of
from tasks.paths import Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params

TAG_WEIGHTS_MD5 = "checkpoint.weights_md5"
TAG_METRICS_MD5 = "checkpoint.metrics_md5"


def metrics_digest(metrics: dict[str, float]) -> str:
    return hashlib.md5(json.dumps(metrics, sort_keys=True).encode()).hexdigest()


def _already_registered(client, model_name: str, weights_md5: str):
    from registry.models import list_versions

    for mv in list_versions(client, model_name):
        if mv.tags.get(TAG_WEIGHTS_MD5) == weights_md5:
            return mv
    return None


def _flatten(tree: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        out |= _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": float(value)}
    return out


def checkpoint_metrics(params: Params, name: str) -> dict[str, float]:
    """SconeEval averages and per-task figures, compositional T2I accuracy, MICo-Bench and MIGE-Bench figures (when
    the checkpoint's scores have them), held-out understanding accuracy per question type and, for SRUM rounds,
    reward statistics."""
    from registry import SRUM_PREFIX, T2I_PREFIX, UNDERSTANDING_PREFIX, mico_metrics, mige_metrics, sconeeval_metrics

    paths = Paths.from_params(params)
    summary_path = paths.sconeeval_summary(name)
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} not found: run `scone eval checkpoint {name}` first")
    metrics = sconeeval_metrics(json.loads(summary_path.read_text()))
    t2i_path = paths.t2i_scores(name)
    if t2i_path.exists():
        t2i = json.loads(t2i_path.read_text())
        metrics[f"{T2I_PREFIX}mean"] = float(t2i["mean"])
        metrics.update({f"{T2I_PREFIX}{k}": float(v) for k, v in t2i["per_category"].items()})
    for benchmark, convert in (("mico", mico_metrics), ("mige", mige_metrics)):
        heldout = paths.heldout_scores(name, benchmark) / "summary.json"
        if heldout.exists():
            metrics.update(convert(json.loads(heldout.read_text())))
    understanding = paths.understanding_metrics(name)  # held-out accuracy per question type (evaluate), nested
    if understanding.exists():
        metrics.update(_flatten(json.loads(understanding.read_text()), UNDERSTANDING_PREFIX))
    if is_srum(name):
        stats_path = paths.srum_round(srum_index(name)) / "summary.json"
        if stats_path.exists():
            stats = json.loads(stats_path.read_text()).get("reward_stats", {})
            metrics.update({f"{SRUM_PREFIX}{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))})
    return metrics


def sampling_settings(params: Params, name: str) -> dict:
    """The settings the checkpoint's scores were measured with: the registered pipeline samples with them."""
    from tasks.checkpoints import uses_bridge

    s = params.eval.sampling
    return {"steps": s.steps, "cfg_text": s.cfg_text, "cfg_image": s.cfg_image, "bridge": uses_bridge(params, name),
            "seed": params.eval.seed}


def register_step(params: Params, name: str) -> dict:
    from registry.gate import TAG_DECISION, apply_gate
    from registry.models import register_checkpoint
    from registry.plots import loss_plot
    from registry.tracking import Tracker, dvc_data_hash, source_tags
    from model.pipeline import pipeline_settings
    from tasks.mlflow_runs import recorded_run

    paths = Paths.from_params(params)
    ckpt = paths.checkpoint(name)
    weights = sorted(ckpt.glob("*.safetensors"))  # one file or shards; a release's ae.safetensors among them
    if not weights:
        raise FileNotFoundError(f"no weights (*.safetensors) in {ckpt}: train checkpoint {name!r} first")
    metrics = checkpoint_metrics(params, name)
    tracker = Tracker(params.registry, Path("."))
    md5 = hashlib.md5("".join(f"{w.name}:{file_md5(w)}" for w in weights).encode()).hexdigest()
    scores_md5 = metrics_digest(metrics)
    model_name = params.registry.model_name
    existing = _already_registered(tracker.client, model_name, md5)
    if existing is None:
        datasets = data_dirs(params, name)
        run_tags = source_tags(Path("."), f"scone register ({name})")
        trained_in = recorded_run(tracker, ckpt)  # the run the checkpoint's curves streamed to, if this store has it
        with tracker.continue_run(trained_in, name, data_hash=dvc_data_hash(datasets, Path(".")), tags=run_tags) \
                as run_id, staged(paths.root, f"register-{name}") as tmp:
            stage = stage_of(params, name)
            tracker.log_params(run_id, {"model": params.model.model_dump(), "train": params.train.model_dump(exclude={"stages"}),
                                        "stage": params.train.stages[stage].model_dump(), "eval": params.eval.model_dump(),
                                        **({"srum": params.srum.model_dump()} if is_srum(name) else {})})
            tracker.log_datasets(run_id, datasets)
            if paths.train_log(name).exists():
                if trained_in is None:  # no live curves: replay the training log
                    tracker.log_metrics_file(run_id, paths.train_log(name))
                plot = loss_plot(paths.train_log(name), tmp / "loss.png", title=f"{name}: training loss")
                if plot is not None:
                    tracker.log_artifact(run_id, plot, "plots")
            t2i = paths.t2i_scores(name)
            if t2i.exists():
                tracker.log_artifact(run_id, t2i, "eval")
            tracker.set_tags(run_id, {TAG_WEIGHTS_MD5: md5})
            # the identity tags are part of the version's creation: a kill right after it still finds it
            version = register_checkpoint(
                tracker, run_id, ckpt, model_name, metrics,
                description=f"{name}: SconeEval Overall {metrics.get('sconeeval.overall', float('nan')):.3f}",
                eval_summary=paths.sconeeval_summary(name),
                extra_tags={TAG_WEIGHTS_MD5: md5, TAG_METRICS_MD5: scores_md5},
                sampling=sampling_settings(params, name), staging=tmp, pipeline=pipeline_settings(params.model),
            )
        existing = tracker.client.get_model_version(model_name, version.version)
        fresh = True
    else:
        fresh = False
        if existing.tags.get(TAG_METRICS_MD5) != scores_md5:  # same weights, recomputed scores
            from registry.models import update_version_metrics

            update_version_metrics(tracker, existing, metrics)
            tracker.client.set_model_version_tag(model_name, existing.version, TAG_METRICS_MD5, scores_md5)
    if fresh or existing.tags.get(TAG_METRICS_MD5) != scores_md5 or TAG_DECISION not in existing.tags:
        # a new version, new scores, or a version whose gating was interrupted: decide (again)
        decision = apply_gate(tracker.client, model_name, existing.version, params.registry.gate)
        record = {"name": name, "version": existing.version, "run_id": existing.run_id, "decision": decision.decision,
                  "reasons": decision.reasons, "reused": not fresh}
    else:  # nothing new to record
        record = {"name": name, "version": existing.version, "run_id": existing.run_id,
                  "decision": existing.tags.get(TAG_DECISION), "reused": True}
    record["metrics"] = metrics
    write_json(paths.registry_records / f"{name}.json", record)
    return record


def register_all_step(params: Params) -> list[dict]:
    """Every checkpoint of the chain that generates, in chain order (the gate compares each with the champion before
    it); a checkpoint whose generation expert no stage has trained yet is no generation model (tasks.checkpoints)."""
    from tasks.checkpoints import generation_trained
    from tasks.paths import checkpoint_names

    records = [register_step(params, name) for name in checkpoint_names(params) if generation_trained(params, name)]
    write_json(Paths.from_params(params).leaderboard, [
        {"checkpoint": r["name"], "version": int(r["version"]), "gate": r.get("decision"),
         **{k.replace("sconeeval.", "sconeeval_"): round(v, 6) for k, v in r["metrics"].items()
            if k in ("sconeeval.overall", "sconeeval.com", "sconeeval.dis")},
         "t2i_accuracy": round(r["metrics"].get("t2i.mean", 0.0), 6),
         **{k.replace(".", "_"): round(r["metrics"][k], 6) for k in ("mico.overall", "mige.overall")
            if k in r["metrics"]}}
        for r in records])
    return records


register_task = task(register_step, name="register", task_run_name="register-{name}")
register_all_task = task(register_all_step, name="register_all")
