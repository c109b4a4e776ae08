"""Benchmark scoring of one checkpoint: generate -> judge -> score (SconeEval layout) + compositional T2I, and the
held-out MICo-Bench and MIGE-Bench in their own layouts (one sampling round over both, oracle judge:
evaluation.heldout_runner) under `artifacts/scores/<name>/mico/` and `.../mige/`.

The scores are written into a staging folder and replace `artifacts/scores/<name>/` only when every round and
scoring has finished: a judge that fails after its retries leaves the previous scores exactly as they were.
Whether scoring must run at all is DVC's call (tasks.freshness), never this step's.

Every checkpoint's understanding is scored too (`understanding_step`: the held-out understanding questions,
accuracy per question type); a checkpoint whose generation expert no stage has trained yet (und_pretrain) gets
only that (`understanding_only_step`).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from prefect import task

from tasks.atomic import publish, staged, write_json
from tasks.dvc_metrics import headline_scores, heldout_headline
from tasks.checkpoints import generation_trained, uses_bridge
from tasks.diagnostics import diagnostics_step
from tasks.paths import HELDOUT_BENCHMARKS, Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params


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


def heldout_metrics(summaries: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{benchmark: registry metrics} of the MICo-Bench and MIGE-Bench summaries (registry.mico_metrics, mige_metrics)."""
    from registry import mico_metrics, mige_metrics

    convert = {"mico": mico_metrics, "mige": mige_metrics}
    return {b: convert[b](s) for b, s in summaries.items()}


def log_to_checkpoint_run(params: Params, ckpt, summary: dict, t2i: dict, scores_dir, heldout: dict | None = None) -> None:
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
        for figures in (heldout or {}).values():
            metrics.update(figures)
        tracker.log_metrics(run_id, metrics)
        with tempfile.TemporaryDirectory() as tmp:  # not under artifacts/: nothing stray in a DVC output
            grid = sample_grid(scores_dir, summary.get("sample_images") or [], Path(tmp) / "samples.png")
            if grid is not None:
                tracker.log_artifact(run_id, grid, "samples")


def evaluate_step(params: Params, name: str) -> dict:
    from data.formats.srum_prompts import read_prompts
    from evaluation.heldout_runner import evaluate_heldout_dirs
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
    if not generation_trained(params, name):
        return understanding_only_step(params, name, pipe)
    with staged(paths.root, f"scores-{name}") as tmp:
        out = tmp / name
        summary = evaluate_checkpoint_dir(ckpt, paths.sconeeval_bench, out, params.eval, model_name=name,
                                          bridge=bridge, pipeline=pipe)
        prompts = read_prompts(paths.srum_prompts)
        generate_fn = generate_fn_from_checkpoint(ckpt, params.eval.sampling, bridge, pipeline=pipe)
        t2i = evaluate_t2i(generate_fn, prompts, seed=params.eval.seed)
        (out / "t2i.json").write_text(json.dumps(t2i, indent=1))
        # MICo-Bench and MIGE-Bench: out/mico/, out/mige/ in their layouts (one round, the oracle: exact ground truth)
        heldout = evaluate_heldout_dirs(pipe, paths.heldout_bench("mico"), paths.heldout_bench("mige"), out,
                                        params.eval, model_name=name, bridge=bridge)
        publish([(out, paths.score_dir(name))])
    write_json(paths.score_metrics(name), headline_scores(summary, t2i))
    figures = heldout_metrics(heldout)
    for benchmark, metrics in figures.items():
        write_json(paths.heldout_metrics(name, benchmark), heldout_headline(metrics))
    log_to_checkpoint_run(params, ckpt, summary, t2i, paths.score_dir(name) / name, figures)
    diagnostics_step(params, name, pipe)  # bridge localisation, self vs oracle judge, contact sheet
    understanding_step(params, name, pipe)
    print(format_table3([(name, summary)], style="plain"))
    print(f"MICo-Bench W-Ref-VIEScore {heldout['mico']['overall']['score']:.2f} / 100, "
          f"MIGE-Bench {heldout['mige']['overall'].get('score', float('nan')):.2f} / 10")
    return {"name": name, "sconeeval": summary.get("average"), "t2i": t2i.get("mean"),
            "mico": heldout["mico"]["overall"].get("score"), "mige": heldout["mige"]["overall"].get("score")}


def understanding_step(params: Params, name: str, pipe) -> dict:
    """Held-out understanding accuracy of checkpoint `name` (evaluation.understanding), after its scores folder is
    published: each question's answer into <scores>/<name>/understanding.json, the accuracies per type into its DVC
    metrics file (metrics/understanding/<name>.json) and its MLflow run (with the answers file)."""
    from pathlib import Path

    from evaluation.understanding import evaluate_understanding, flat_metrics, format_summary, headline
    from registry.tracking import Tracker
    from tasks.mlflow_runs import recorded_run

    paths = Paths.from_params(params)
    summary, records = evaluate_understanding(pipe, paths.data)
    answers = paths.score_dir(name) / "understanding.json"
    write_json(answers, {"summary": summary, "answers": records})
    write_json(paths.understanding_metrics(name), headline(summary))
    metrics = flat_metrics(summary)
    tracker = Tracker(params.registry, Path("."))
    run_id = recorded_run(tracker, paths.checkpoint(name))
    if run_id is not None:
        tracker.log_metrics(run_id, metrics)
        tracker.log_artifact(run_id, answers, "eval")
    print(format_summary(name, summary))
    return summary


def understanding_only_step(params: Params, name: str, pipe) -> dict:
    """A checkpoint whose generation expert no stage has trained (tasks.checkpoints.generation_trained) samples
    with the release's weights: only its understanding is scored. The generation metrics files the evaluate stage
    declares hold no figures ({}), and register leaves the checkpoint out."""
    paths = Paths.from_params(params)
    with staged(paths.root, f"scores-{name}") as tmp:
        (tmp / name).mkdir(parents=True)
        publish([(tmp / name, paths.score_dir(name))])
    for empty in (paths.score_metrics(name), *(paths.heldout_metrics(name, b) for b in HELDOUT_BENCHMARKS)):
        write_json(empty, {})
    print(f"{name}: the generation expert is not trained yet; generation benchmarks skipped")
    summary = understanding_step(params, name, pipe)
    diagnostics_step(params, name, pipe)  # the bridge's figures (no generated images to judge yet)
    return {"name": name, "understanding_yes_no": summary.get("yes_no")}


evaluate_task = task(evaluate_step, name="evaluate", task_run_name="evaluate-{name}", retries=1, retry_delay_seconds=10)
