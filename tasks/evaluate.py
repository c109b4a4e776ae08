"""Benchmark scoring of one checkpoint: generate -> judge -> score (SconeEval layout) + compositional T2I.

The scores are written into a staging folder and replace `artifacts/scores/<name>/` only when every round and
scoring has finished: a judge that fails after its retries leaves the previous scores exactly as they were.
Whether scoring must run at all is DVC's call (tasks.freshness), never this step's.
"""
from __future__ import annotations

import json

from prefect import task

from tasks.atomic import publish, staged, write_json
from tasks.dvc_metrics import headline_scores
from tasks.checkpoints import uses_bridge
from tasks.paths import Paths


def sample_grid(model_dir, relative_paths: list[str], out, thumb: int = 128):
    """The sample images a summary lists, side by side (nearest-neighbour upscaled: the pixels as generated)."""
    from pathlib import Path

    from PIL import Image

    images = [Image.open(Path(model_dir) / p).convert("RGB") for p in relative_paths if (Path(model_dir) / p).exists()]
    if not images:
        return None
    grid = Image.new("RGB", (thumb * len(images), thumb), "white")
    for i, img in enumerate(images):
        grid.paste(img.resize((thumb, thumb), Image.NEAREST), (i * thumb, 0))
    grid.save(out)
    return Path(out)


def log_to_checkpoint_run(params, ckpt, summary: dict, t2i: dict, scores_dir) -> None:
    """The scores and a grid of samples join the MLflow run the checkpoint was trained in (its curves are there
    already); the registry adds the rest when it registers the version. A clone whose store lacks that run skips it."""
    import tempfile
    from pathlib import Path

    from registry import T2I_PREFIX, sconeeval_metrics
    from registry.tracking import Tracker
    from tasks.mlflow_runs import recorded_run

    tracker = Tracker(params.registry, Path("."))
    run_id = recorded_run(tracker, ckpt)
    if run_id is not None:
        metrics = sconeeval_metrics(summary)
        metrics[f"{T2I_PREFIX}mean"] = float(t2i.get("mean", 0.0))
        tracker.log_metrics(run_id, metrics)
        with tempfile.TemporaryDirectory() as tmp:  # not under artifacts/: nothing stray in a DVC output
            grid = sample_grid(scores_dir, summary.get("sample_images") or [], Path(tmp) / "samples.png")
            if grid is not None:
                tracker.log_artifact(run_id, grid, "samples")


def evaluate_step(params, name: str) -> dict:
    from data.formats.srum_prompts import read_prompts
    from evaluation.runner import evaluate_checkpoint_dir, generate_fn_from_checkpoint
    from evaluation.sconeeval import format_table3
    from evaluation.t2i import evaluate_t2i
    from model.pipeline import load_pipeline, pipeline_settings

    paths = Paths.from_params(params)
    ckpt = paths.checkpoint(name)
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"checkpoint {ckpt} not found: run `scone train --stage {name}` (or the pipeline) first")
    bridge = uses_bridge(params, name)
    pipe = load_pipeline(ckpt, pipeline_settings(params.model))  # loaded once: SconeEval, T2I and the self judge
    with staged(paths.root, f"scores-{name}") as tmp:
        out = tmp / name
        summary = evaluate_checkpoint_dir(ckpt, paths.data / "sconeeval_bench", out, params.eval, model_name=name,
                                          bridge=bridge, pipeline=pipe)
        prompts = read_prompts(paths.data / "srum_prompts" / "prompts.jsonl")
        generate_fn = generate_fn_from_checkpoint(ckpt, params.eval.sampling, bridge, pipeline=pipe)
        t2i = evaluate_t2i(generate_fn, prompts, seed=params.eval.seed)
        (out / "t2i.json").write_text(json.dumps(t2i, indent=1))
        publish([(out, paths.score_dir(name))])
    write_json(paths.score_metrics(name), headline_scores(summary, t2i))
    log_to_checkpoint_run(params, ckpt, summary, t2i, paths.score_dir(name) / name)
    print(format_table3([(name, summary)], style="plain"))
    return {"name": name, "sconeeval": summary.get("average"), "t2i": t2i.get("mean")}


evaluate_task = task(evaluate_step, name="evaluate", task_run_name="evaluate-{name}", retries=1, retry_delay_seconds=10)
