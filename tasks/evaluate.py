"""Benchmark scoring of one checkpoint: generate -> judge -> score (SconeEval layout) + compositional T2I."""
from __future__ import annotations

import json

from prefect import task

from tasks.checkpoints import uses_bridge
from tasks.paths import Paths
from tasks.stamps import file_md5, is_fresh, tree_md5, write_stamp


def evaluate_step(params, name: str) -> dict:
    from evaluation.runner import evaluate_checkpoint_dir, generate_fn_from_checkpoint
    from evaluation.sconeeval import format_table3
    from data.formats.srum_prompts import read_prompts
    from evaluation.t2i import evaluate_t2i

    paths = Paths.from_params(params)
    ckpt = paths.checkpoint(name)
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"checkpoint {ckpt} not found: run `scone train --stage {name}` (or the pipeline) first")
    out = paths.score_dir(name)
    bridge = uses_bridge(params, name)
    summary_path = out / name / "summary.json"
    inputs = {"weights": file_md5(ckpt / "model.safetensors"), "eval": params.eval.model_dump(), "bridge": bridge,
              "bench": tree_md5(paths.data / "sconeeval_bench"), "prompts": tree_md5(paths.data / "srum_prompts")}
    if is_fresh(out, inputs, [summary_path, out / "t2i.json"]):
        summary, t2i = json.loads(summary_path.read_text()), json.loads((out / "t2i.json").read_text())
        print(f"{name}: scores up to date (same weights, benchmark and eval params)")
        return {"name": name, "sconeeval": summary.get("average"), "t2i": t2i.get("mean"), "cached": True}
    summary = evaluate_checkpoint_dir(ckpt, paths.data / "sconeeval_bench", out, params.eval, model_name=name, bridge=bridge)
    prompts = read_prompts(paths.data / "srum_prompts" / "prompts.jsonl")
    generate_fn = generate_fn_from_checkpoint(ckpt, params.eval.sampling, bridge)
    t2i = evaluate_t2i(generate_fn, prompts, seed=params.eval.seed)
    (out / "t2i.json").write_text(json.dumps(t2i, indent=1))
    write_stamp(out, inputs)
    print(format_table3([(name, summary)], style="plain"))
    return {"name": name, "sconeeval": summary.get("average"), "t2i": t2i.get("mean")}


evaluate_task = task(evaluate_step, name="evaluate", task_run_name="evaluate-{name}", retries=1, retry_delay_seconds=10)
