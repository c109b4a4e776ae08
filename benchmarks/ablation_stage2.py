"""`scone bench ablation-stage2`: the Scone paper's Table 5 and Table 6 in miniature.

Versions, all scored with the oracle judge on the held-out SconeEval split, Stage II versions over several
training seeds (mean +- std):
  Base          the release directory the chain's first stage starts from (model.release, else the chain's own
                bootstrapped release of model.preset: fresh weights)
  Stage I       the pipeline's stage1_step2 checkpoint (tasks.paths.STAGE1_FINAL)
  Stage II (a)  direct: both experts, 2N steps, no bridge
  Stage II (b)  two-step without bridge: N steps und. expert only, then N steps both experts
  Stage II (c)  two-step with bridge: as (b) with the semantic mask (straight-through formation in step 1)
and a tau sweep of (c) like Table 6. Every Stage II version starts from the same Stage I checkpoint and sees the
same data for the same number of steps, as the paper's 1k + 1k vs 2k comparison.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.paths import STAGE1_FINAL, STAGE2_FINAL, Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params

DEFAULT_STEPS = 50  # N: steps per Stage II step (the paper: 1k)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_TAUS = (0.02, 0.88)


def _versions(params: Params, steps: int) -> dict[str, list]:
    """Each version as a list of (stage name, StageConfig) run in order from the Stage I checkpoint."""
    base = params.train.stages[STAGE2_FINAL]
    both = base.model_copy(update={"steps": steps, "bridge": False, "bridge_straight_through": False,
                                   "train_understanding": True, "train_generation": True})
    und_only = both.model_copy(update={"train_generation": False})
    return {
        "stage2_a_direct": [("a_direct", both.model_copy(update={"steps": 2 * steps}))],
        "stage2_b_two_step": [("b_step1", und_only), ("b_step2", both)],
        "stage2_c_two_step_bridge": [
            ("c_step1", und_only.model_copy(update={"bridge": True, "bridge_straight_through": True})),
            ("c_step2", both.model_copy(update={"bridge": True})),
        ],
    }


def _score(ckpt: Path, params: Params, out: Path, name: str, bridge: bool, model_cfg=None) -> dict:
    from evaluation.runner import evaluate_checkpoint_dir
    from model.pipeline import pipeline_settings

    eval_cfg = params.eval.model_copy(update={"rounds": 1, "scorings": 1, "judge": "oracle"})
    bench = Paths.from_params(params).sconeeval_bench
    # a release stores no bridge settings: the ones the version was trained with, as the chain's eval step passes
    settings = pipeline_settings(model_cfg or params.model)
    return evaluate_checkpoint_dir(ckpt, bench, out, eval_cfg, model_name=name, bridge=bridge,
                                   pipeline_settings=settings)["average"]


def _train_chain(chain, start: Path, params: Params, model_cfg, out: Path, seed: int) -> Path:
    from model.bagel.release import FAMILY_SPEC
    from model.launch import run_stage

    train = params.train.model_copy(update={"seed": seed, "num_ranks": 1})
    init = start
    for stage_name, stage in chain:
        ckpt = out / stage_name
        run_stage(stage_name, stage.model_copy(update={"init_from": None}), train, model_cfg, params.data.root,
                  ckpt, init_checkpoint=init, progress=False, model_family=FAMILY_SPEC)
        init = ckpt
    return init


def _mean_std(rows: list[dict]) -> dict:
    out = {}
    for k in ("COM", "DIS", "Overall"):
        vals = [r[k] for r in rows]
        out[k] = {"mean": round(statistics.fmean(vals), 4),
                  "std": round(statistics.pstdev(vals), 4) if len(vals) > 1 else 0.0, "runs": vals}
    return out


def table5_markdown(result: dict) -> str:
    lines = ["| Stage | Version | COM | DIS | Overall |", "|---|---|---:|---:|---:|"]
    for name, row in result["versions"].items():
        cells = [f"{row[k]['mean']:.2f} ± {row[k]['std']:.2f}" for k in ("COM", "DIS", "Overall")]
        lines.append(f"| {row['stage']} | {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(params: Params, out: Path, steps: int = DEFAULT_STEPS, seeds=DEFAULT_SEEDS, taus=DEFAULT_TAUS) -> dict:
    from data.formats.sconeeval import read_bench
    from model.pipeline import is_release_dir

    t0 = time.perf_counter()
    work = Path(out).with_suffix("")  # artifacts/bench/ablation-stage2/
    paths = Paths.from_params(params)
    stage1 = paths.checkpoint(STAGE1_FINAL)
    if not is_release_dir(stage1):
        raise FileNotFoundError(f"{stage1} holds no checkpoint: run `scone pipeline` (or `dvc repro "
                                f"train@{STAGE1_FINAL}`) first")
    base = paths.release(params)
    if not is_release_dir(base):
        raise FileNotFoundError(f"{base} holds no release directory: run `scone bootstrap tokenizer|autoencoder|vit|"
                                "release` (or point model.release at a downloaded one)")
    model_cfg = params.model

    base_label = base.name if params.model.release else f"bootstrapped {params.model.preset} (fresh weights)"
    versions = {
        "base": {"stage": "Base", "label": base_label,
                 **_mean_std([_score(base, params, work / "scores", "base", False)])},
        "stage1": {"stage": "Stage I", "label": STAGE1_FINAL,
                   **_mean_std([_score(stage1, params, work / "scores", "stage1", False)])},
    }
    labels = {"stage2_a_direct": "(a) direct", "stage2_b_two_step": "(b) two-step, no bridge",
              "stage2_c_two_step_bridge": "(c) two-step, bridge"}
    for vname, chain in _versions(params, steps).items():
        rows = []
        for seed in seeds:
            ckpt = _train_chain(chain, stage1, params, model_cfg, work / f"{vname}_s{seed}", seed)
            bridge = vname.endswith("bridge")
            rows.append(_score(ckpt, params, work / "scores", f"{vname}_s{seed}", bridge))
        versions[vname] = {"stage": "Stage II", "label": labels[vname], **_mean_std(rows)}

    sweep = {}
    chain = _versions(params, steps)["stage2_c_two_step_bridge"]
    for tau in taus:
        cfg = model_cfg.model_copy(update={"bridge": model_cfg.bridge.model_copy(update={"tau": tau})})
        ckpt = _train_chain(chain, stage1, params, cfg, work / f"tau_{tau}", seeds[0])
        sweep[str(tau)] = _score(ckpt, params, work / "scores", f"tau_{tau}", True, cfg)

    c, b = versions["stage2_c_two_step_bridge"], versions["stage2_b_two_step"]
    gap = c["DIS"]["mean"] - b["DIS"]["mean"]
    result = {
        "benchmark": "ablation-stage2",
        "steps_per_stage2_step": steps,
        "seeds": list(seeds),
        "bench_cases": len(read_bench(paths.sconeeval_bench)),
        "versions": versions,
        "tau_sweep": sweep,
        "c_minus_b_dis": round(gap, 4),
        "c_beats_b_on_dis_beyond_std": gap > max(c["DIS"]["std"], b["DIS"]["std"]),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result["table5_markdown"] = table5_markdown(result)
    Path(out).write_text(json.dumps(result, indent=1))
    return result
