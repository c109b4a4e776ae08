"""`scone bench srum-ablation`: SRUM's reward ablation (Figure 3 left, Sec. 4) and its SFT baseline in miniature.

Every variant starts from the same checkpoint (`srum.init_from`) and trains one round with the SRUM recipe
(params `srum:`) on the SAME self-generated candidates: per seed the model samples K candidates per prompt once,
the configured judge (`srum.judge`) scores them once, and only what the trainer makes of those judgments changes:

  sft              plain flow matching on the self-generated images (R = 1 everywhere) + the same constraint:
                   the paper's "SFT on the same self-generated data"
  srum             the full dense map (regions lift their boxes, times the global layout factor) + constraint
  sample_level     one scalar per image: the mean of the full map, spread over every token
  binarised        the full map on the latent grid thresholded at the neutral 0.5 -> {0, 1}
  no_constraint    the full map with lambda_c = 0 (the paper's "w/o KL constraint")
  no_global        the map without the global layout factor (the global judgment replaced by neutral 0)
and controls the paper does not have, to read the others against:
  reference_only     R = 0: only lambda_c * L_ref, i.e. what the ground-truth constraint alone does
  srum_self_judge    the full SRUM map built from the `self` judge (the model's understanding expert)
  srum_oracle_judge  the full SRUM map built from the `oracle` judge (the prompt's exact scene)
(the judge control equal to the configured judge is the `srum` row itself and is left out by default).

Score: compositional T2I accuracy per category (evaluation.t2i) on the round's own prompts (in-domain, as the
pipeline reports) and on held-out prompts of the same world (another prompt stream, as T2I-CompBench's test
split), `eval_samples` images per prompt, per seed; then mean +- std over the seeds. How the `self` judge's
scores agree with the `oracle`'s on the same candidates is reported beside it, since it decides what the
self-reward can teach. Each seed's judgments are kept as `seed<k>/rewards_<judge>.jsonl` (SRUM reward JSONL).
"""
from __future__ import annotations

import json
import numbers
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EVAL_SAMPLES = 4
HELDOUT_STREAM = "srum_prompts_eval"  # same world and subject combos as the SRUM prompts, other draws
HELDOUT_PER_CATEGORY = 4
NEUTRAL = 0.5

VARIANTS: dict[str, str] = {
    "sft": "SFT on the same self-generated images (R = 1)",
    "srum": "SRUM (dense map, global factor, constraint)",
    "sample_level": "sample-level reward (map mean)",
    "binarised": "binarised reward (map >= 0.5)",
    "no_constraint": "no constraint (lambda_c = 0)",
    "no_global": "no global reward",
    "reference_only": "control: constraint only (R = 0)",
    "srum_self_judge": "control: SRUM with the self judge",
    "srum_oracle_judge": "control: SRUM with the oracle judge",
}
JUDGE_CONTROLS = {"srum_self_judge": "self", "srum_oracle_judge": "oracle"}
PAPER_VARIANTS = ("sft", "srum", "sample_level", "binarised", "no_constraint", "no_global")


# ------------------------------------------------------------------------------------------ reward variants


def variant_map(variant: str, vlm_rewards: Sequence[dict], width: int, height: int,
                grid: int | tuple[int, int]) -> np.ndarray:
    """The loss-weight map on the latent grid (rows, cols; an int: square) a variant trains with, from one
    candidate's judgments."""
    from data.formats.srum_rewards import GLOBAL_OBJECT
    from model.reward_map import reward_map, to_latent_grid

    shape = (int(grid), int(grid)) if isinstance(grid, numbers.Integral) else (int(grid[0]), int(grid[1]))
    if variant == "sft":
        return np.ones(shape, dtype=np.float32)
    if variant == "reference_only":
        return np.zeros(shape, dtype=np.float32)
    if variant == "no_global":  # kept as an entry of score 0, so the map builder does not warn about a missing one
        vlm_rewards = [{**e, "score": 0.0} if isinstance(e, dict) and e.get("object") == GLOBAL_OBJECT else e
                       for e in vlm_rewards]
    full = to_latent_grid(reward_map(vlm_rewards, width, height), shape).astype(np.float32)
    if variant in ("srum", "no_constraint", "no_global", *JUDGE_CONTROLS):
        return full
    if variant == "sample_level":
        return np.full(shape, float(full.mean()), dtype=np.float32)
    if variant == "binarised":
        return (full >= NEUTRAL).astype(np.float32)
    raise ValueError(f"unknown SRUM ablation variant {variant!r}; expected one of {sorted(VARIANTS)}")


def variant_config(variant: str, srum_cfg, seed: int):
    """The round's SrumConfig for a variant: the recipe of params `srum:`, the seed, lambda_c = 0 where asked."""
    update = {"seed": seed}
    if variant == "no_constraint":
        update["lambda_c"] = 0.0
    return srum_cfg.model_copy(update=update)


# ------------------------------------------------------------------------------------------ scoring


def found_rate(t2i: dict) -> float:
    """Share of ground-truth subjects found in the generated images (softer than the category scores)."""
    found = [s["found"] for p in t2i["per_prompt"] for s in p["subjects"]]
    return float(np.mean(found)) if found else 0.0


def score_checkpoint(ckpt: Path, prompt_sets: dict[str, list], sampling, bridge: bool, seeds: Sequence[int],
                     settings: dict | None = None, pipeline=None) -> dict:
    """T2I accuracy per prompt set, averaged over `seeds` (one image per prompt and seed). `settings`: the
    pipeline settings (model.pipeline.pipeline_settings) a release does not store, the bridge's among them;
    `pipeline`: `ckpt` already loaded with them."""
    from evaluation.runner import generate_fn_from_checkpoint
    from evaluation.t2i import evaluate_t2i

    generate_fn = generate_fn_from_checkpoint(ckpt, sampling, bridge, settings, pipeline=pipeline)
    out = {}
    for name, rows in prompt_sets.items():
        runs = [evaluate_t2i(generate_fn, rows, seed=s) for s in seeds]
        cats = runs[0]["per_category"].keys()
        per_category = {c: float(np.mean([r["per_category"][c] for r in runs])) for c in cats}
        out[name] = {"per_category": per_category, "mean": float(np.mean(list(per_category.values()))),
                     "found": float(np.mean([found_rate(r) for r in runs])), "prompts": len(rows), "samples": len(seeds)}
    return out


def mean_std(runs: list[dict]) -> dict:
    """{set: {mean, found, per_category}: {mean, std, runs}} over seeds (population std, as ablation-stage2)."""
    def ms(values: list[float]) -> dict:
        return {"mean": round(statistics.fmean(values), 4),
                "std": round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0,
                "runs": [round(v, 4) for v in values]}

    out = {}
    for name in runs[0]:
        cats = runs[0][name]["per_category"]
        out[name] = {"mean": ms([r[name]["mean"] for r in runs]), "found": ms([r[name]["found"] for r in runs]),
                     "per_category": {c: ms([r[name]["per_category"][c] for r in runs]) for c in cats}}
    return out


def judge_agreement(records_a: Sequence[dict], records_b: Sequence[dict]) -> dict:
    """How two judges' scores of the same candidates and regions agree: Pearson r and sign agreement."""
    def stats(pairs: list[tuple[float, float]]) -> dict:
        if len(pairs) < 2:
            return {"n": len(pairs), "pearson": None, "sign_agreement": None}
        a, b = np.array(pairs).T
        r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None
        return {"n": len(pairs), "pearson": None if r is None else round(r, 3),
                "sign_agreement": round(float(np.mean(np.sign(a) == np.sign(b))), 3)}

    glob, regions = [], []
    for ra, rb in zip(records_a, records_b):
        ea, eb = ra["vlm_rewards"], rb["vlm_rewards"]
        glob.append((ea[0]["score"], eb[0]["score"]))
        regions += [(x["score"], y["score"]) for x, y in zip(ea[1:], eb[1:])]
    return {"global": stats(glob), "regions": stats(regions)}


# ------------------------------------------------------------------------------------------ report


def table_markdown(result: dict, prompt_set: str) -> str:
    """Variants x categories, mean +- std over seeds, for one prompt set."""
    from evaluation.t2i import CATEGORIES

    rows = result["variants"]
    init = result["init"]["scores"][prompt_set]
    cats = [c for c in CATEGORIES if c in init["per_category"]]
    head = "| Variant | " + " | ".join(cats) + " | mean | found |"
    lines = [head, "|---|" + "---:|" * (len(cats) + 2)]
    lines.append(f"| {result['init']['label']} | " + " | ".join(f"{init['per_category'][c]:.3f}" for c in cats)
                 + f" | **{init['mean']:.3f}** | {init['found']:.3f} |")
    for name, row in rows.items():
        s = row["scores"][prompt_set]
        cells = [f"{s['per_category'][c]['mean']:.3f} ± {s['per_category'][c]['std']:.3f}" for c in cats]
        cells += [f"**{s['mean']['mean']:.3f} ± {s['mean']['std']:.3f}**", f"{s['found']['mean']:.3f} ± {s['found']['std']:.3f}"]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the bench


def heldout_prompts(data_cfg, per_category: int = HELDOUT_PER_CATEGORY) -> list[dict]:
    """Prompts of the SRUM prompt world drawn from another stream: never trained on, same distribution."""
    from data.formats.srum_prompts import CATEGORIES, make_prompts
    from data.scene import Scene
    from data.world import dataset_world

    rows = make_prompts(dataset_world(data_cfg, HELDOUT_STREAM), per_category * len(CATEGORIES))
    return [{**r, "key": r["key"].replace("srum_", "heldout_"), "target": Scene.from_dict(r["target"])} for r in rows]


def default_variants(configured_judge: str) -> tuple[str, ...]:
    """The paper's variants, the constraint-only control and the judge control(s) other than the configured judge."""
    return tuple(v for v in VARIANTS if JUDGE_CONTROLS.get(v) != configured_judge)


def run(params: Params, out: Path, seeds: Sequence[int] = DEFAULT_SEEDS, variants: Sequence[str] | None = None,
        eval_samples: int = DEFAULT_EVAL_SAMPLES, heldout_per_category: int = HELDOUT_PER_CATEGORY) -> dict:
    from tqdm.auto import tqdm

    from data.formats.srum_prompts import read_prompts
    from data.formats.srum_rewards import write_rewards
    from data.render import render_array
    from evaluation.srum import candidate_seed, generate_candidates, judge_candidates, make_reward_judge
    from evaluation.t2i import row_target
    from model.pipeline import is_release_dir, load_pipeline, pipeline_settings
    from model.srum_train import SrumCandidate, train_srum_round
    from tasks.paths import Paths

    variants = tuple(variants or default_variants(params.srum.judge))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown SRUM ablation variants {unknown}; expected some of {list(VARIANTS)}")
    t0 = time.perf_counter()
    srum_cfg, sampling = params.srum, params.eval.sampling
    work = Path(out).with_suffix("")  # artifacts/bench/srum-ablation/
    paths = Paths.from_params(params)
    init = paths.checkpoint(srum_cfg.init_from)
    if not is_release_dir(init):
        raise FileNotFoundError(
            f"{init} holds no checkpoint: the ablation starts from srum.init_from ({srum_cfg.init_from}); run "
            f"`scone pipeline` (or `scone train --stage {srum_cfg.init_from}`) first")
    prompts = read_prompts(paths.srum_prompts)
    prompt_sets = {"train_prompts": prompts, "heldout_prompts": heldout_prompts(params.data, heldout_per_category)}
    eval_seeds = [params.eval.seed + i for i in range(eval_samples)]
    bridge = srum_cfg.bridge

    steps = len(seeds) * len(variants) + 1
    bar = tqdm(total=steps, desc="srum-ablation", unit="run")
    settings = pipeline_settings(params.model)
    pipeline = load_pipeline(init, settings)
    init_scores = score_checkpoint(init, prompt_sets, sampling, bridge, eval_seeds, settings, pipeline)
    bar.update(1)

    grid = pipeline.latent_grid
    judge = make_reward_judge(srum_cfg.judge, pipeline=pipeline, openai_cfg=params.eval.openai)
    judges = {judge.name: judge}
    for name in ("self", "oracle"):  # the controls' judges, and both sides of the agreement figure
        judges.setdefault(name, make_reward_judge(name, pipeline=pipeline))
    references = [render_array(row_target(r)) for r in prompts]

    per_variant: dict[str, list[dict]] = {v: [] for v in variants}
    agreement = {}
    for seed in seeds:
        k_seeds = [candidate_seed(seed, 1, k) for k in range(srum_cfg.candidates)]
        examples, per_prompt = generate_candidates(pipeline, prompts, sampling, k_seeds)
        by_judge = {name: judge_candidates(prompts, per_prompt, j) for name, j in judges.items()}
        records = by_judge[judge.name]
        for name, recs in by_judge.items():
            write_rewards(work / f"seed{seed}" / f"rewards_{name}.jsonl", recs)
        agreement[str(seed)] = judge_agreement(by_judge["self"], by_judge["oracle"])
        for variant in variants:
            recs = by_judge[JUDGE_CONTROLS[variant]] if variant in JUDGE_CONTROLS else records
            cands = []
            for j, rec in enumerate(recs):
                i, k = divmod(j, len(k_seeds))
                cands.append(SrumCandidate(examples[i], per_prompt[i][k], variant_map(
                    variant, rec["vlm_rewards"], rec["width"], rec["height"], grid), references[i]))
            ckpt = work / f"seed{seed}" / variant
            train_srum_round(init, cands, variant_config(variant, srum_cfg, seed), params.model, ckpt, train=params.train)
            per_variant[variant].append(score_checkpoint(ckpt, prompt_sets, sampling, bridge, eval_seeds, settings))
            bar.update(1)
    bar.close()

    result = {
        "benchmark": "srum-ablation",
        "init_checkpoint": str(init),
        "judge": judge.name,
        "seeds": list(seeds),
        "eval_samples_per_prompt": eval_samples,
        "recipe": {k: getattr(srum_cfg, k) for k in ("candidates", "steps", "lr", "warmup_steps", "lambda_c", "alpha",
                                                      "micro_batch", "reward_weighting")},
        "prompts": {k: len(v) for k, v in prompt_sets.items()},
        "init": {"label": "init (no round)", "scores": init_scores},
        "variants": {v: {"label": VARIANTS[v], "scores": mean_std(per_variant[v])} for v in variants},
        "self_vs_oracle_judge": agreement,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if "srum" in variants and "sft" in variants:
        for name in prompt_sets:
            s, f = (result["variants"][v]["scores"][name]["mean"] for v in ("srum", "sft"))
            gap = s["mean"] - f["mean"]
            result[f"srum_minus_sft_{name}"] = round(gap, 4)
            result[f"srum_beats_sft_beyond_std_{name}"] = bool(gap > max(s["std"], f["std"]))
    for name in prompt_sets:
        result[f"table_{name}"] = table_markdown(result, name)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    return result
