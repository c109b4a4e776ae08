"""One SRUM round: sample candidates, propose regions, judge them, write rewards, train (SRUM Sec. 3).

Pieces, in the order of the paper's pipeline:

1. candidates: K images per compositional prompt (the round's pipeline over its BAGEL release directory,
   model.pipeline.load_pipeline; one seed per candidate).
2. region proposals (Sec. 3.1) and 3. judgments (Sec. 3.2, Appendix D), global layout and per region, scores
   in [-1, 1] with reasons: evaluation.judges.rewards, the reward protocol of the judge family (`srum.judge`:
   oracle, self or openai, the SconeEval judges' backends over the same detection, matching and client).
4. rewards: one record per candidate in the SRUM regional-reward JSONL (data.formats.srum_rewards), the
   global entry first; dense maps via model.reward_map, area-averaged to the pipeline's latent grid (rows, cols).
5. training: model.srum_train.train_srum_round on (prompt, candidate, map, ground-truth render), on train.num_ranks
   ranks through model.srum_launch.

Files of round k under `out_dir/round_k/`: images/*.png, rewards.jsonl, reward_maps.npy (latent grid,
one per record), summary.json (what run_round returns). The trained checkpoint goes to `ckpt_dir` (default
`out_dir/round_k/checkpoint`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from data.formats.srum_rewards import GLOBAL_OBJECT, write_rewards
from data.render import render_array
from evaluation.detect import resize_to, to_array
from evaluation.judges.rewards import (
    MAX_REGIONS,
    Region,
    RewardJudge,
    clamp_score,
    make_reward_judge,
    prompt_text,
    propose_regions,
    row_field,
)
from evaluation.t2i import row_target
from model.reward_map import reward_map, reward_stats, to_latent_grid


# ---------------------------------------------------------------------------------------------- records


def reward_record(row, image: np.ndarray, regions: Sequence[Region], judge: RewardJudge, extra: dict | None = None) -> dict:
    """One SRUM reward record: the global layout entry (whole image box) then one entry per region.

    `extra` fields (candidate index, seed, image path, ...) are stored beside them."""
    arr = to_array(image)
    h, w = arr.shape[:2]
    g, judged = judge.judge(row, arr, regions)
    if len(judged) != len(regions):
        raise ValueError(f"judge {judge.name!r} returned {len(judged)} regional judgments for {len(regions)} regions")
    rewards = [{"object": GLOBAL_OBJECT, "bbox": [0, 0, w, h], "score": clamp_score(g.score), "reason": g.reason}]
    for r, j in zip(regions, judged):
        rewards.append({"object": j.object or f"{r.colour} region", "bbox": list(r.bbox), "score": clamp_score(j.score),
                        "reason": j.reason})
    return {"key": row_field(row, "key"), "prompt": prompt_text(row), "category": row_field(row, "category"),
            "width": w, "height": h, **(extra or {}), "vlm_rewards": rewards}


def judge_candidates(rows: Sequence, images: Sequence[Sequence[np.ndarray]], judge: RewardJudge, *,
                     max_regions: int = MAX_REGIONS) -> list[dict]:
    """Reward records for images[i][k] = candidate k of prompt rows[i], each judged at the target's size."""
    records = []
    for row, cands in zip(rows, images):
        size = row_target(row).size
        for k, image in enumerate(cands):
            arr = resize_to(to_array(image), size)
            regions = propose_regions(arr, row, max_regions=max_regions)
            records.append(reward_record(row, arr, regions, judge, {"candidate": k}))
    return records


# ---------------------------------------------------------------------------------------------- a round


def candidate_seed(seed: int, round_index: int, k: int) -> int:
    """Sampling seed of candidate k in a round: rounds never reuse each other's noise."""
    return int(np.random.SeedSequence([seed, round_index, k]).generate_state(1)[0] % (2**31))


def generate_candidates(pipeline, prompts: Sequence, sampling, seeds: Sequence[int]
                        ) -> tuple[list, list[list[np.ndarray]]]:
    """(examples, images) with images[i][k] = prompt i sampled by `pipeline` with seeds[k], resized to its
    target's size."""
    from model.batching import Example

    examples = [Example(refs=[], instruction=prompt_text(r)) for r in prompts]
    per_seed = [
        pipeline.generate(examples, steps=sampling.steps, cfg_text=sampling.cfg_text, cfg_image=sampling.cfg_image,
                          seed=s, bridge=False, batch_size=sampling.batch_size)
        for s in seeds  # no references in text-to-image prompts: nothing for the bridge to mask
    ]
    images = [[resize_to(to_array(per_seed[k][i]), row_target(r).size) for k in range(len(seeds))]
              for i, r in enumerate(prompts)]
    return examples, images


def run_round(
    model_dir: str | Path,
    prompts: Sequence,
    srum_cfg,
    sampling,
    out_dir: str | Path,
    round_index: int,
    *,
    ckpt_dir: str | Path | None = None,
    model_cfg=None,
    train_cfg=None,
    judge: RewardJudge | None = None,
    openai_cfg=None,
    max_regions: int = MAX_REGIONS,
    progress: bool = False,
    live_metrics: dict | None = None,
) -> dict:
    """Generate K candidates per prompt, judge them, write rewards and maps, train; return the round summary.

    `prompts`: rows of data.formats.srum_prompts (key, category, prompt, target, layout_specified).
    `srum_cfg`: model.config.SrumConfig; `sampling`: evaluation.config.SamplingConfig (steps, guidance, batch).
    `judge`: a RewardJudge instance; default from srum_cfg.judge (the self judge uses the round's model, the
    openai judge the endpoint settings `openai_cfg`, an evaluation.config.OpenAIJudgeConfig).
    """
    from model.pipeline import load_pipeline, pipeline_settings
    from model.srum_launch import launch_srum_round
    from model.srum_train import SrumCandidate

    if not prompts:
        raise ValueError("run_round needs at least one SRUM prompt; build the srum_prompts dataset first")
    t0 = time.perf_counter()
    round_dir = Path(out_dir) / f"round_{round_index}"
    image_dir = round_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else round_dir / "checkpoint"

    # the round's model settings; without them the release's own image size and no bridge settings (SRUM's prompts
    # are text-to-image: no reference for the bridge to mask while sampling)
    pipeline = load_pipeline(model_dir, None if model_cfg is None else pipeline_settings(model_cfg))
    grid = pipeline.latent_grid
    if judge is None:
        judge = make_reward_judge(srum_cfg.judge, pipeline=pipeline, openai_cfg=openai_cfg)
    seeds = [candidate_seed(srum_cfg.seed, round_index, k) for k in range(srum_cfg.candidates)]
    examples, images = generate_candidates(pipeline, prompts, sampling, seeds)
    t_generate = time.perf_counter() - t0

    t1 = time.perf_counter()
    records, full_maps, candidates = [], [], []
    for i, row in enumerate(prompts):
        reference = render_array(row_target(row))
        for k, s in enumerate(seeds):
            arr = images[i][k]
            name = f"{row_field(row, 'key', f'prompt{i}')}_c{k}.png"
            Image.fromarray(arr).save(image_dir / name)
            rec = reward_record(row, arr, propose_regions(arr, row, max_regions=max_regions), judge,
                                {"candidate": k, "seed": s, "image": f"images/{name}", "round": round_index})
            records.append(rec)
            full = reward_map(rec["vlm_rewards"], rec["width"], rec["height"])
            full_maps.append(full)
            candidates.append(SrumCandidate(examples[i], arr, to_latent_grid(full, grid), reference))
    rewards_path = write_rewards(round_dir / "rewards.jsonl", records)
    maps_path = round_dir / "reward_maps.npy"
    np.save(maps_path, np.stack([c.reward for c in candidates]))
    t_judge = time.perf_counter() - t1
    judge_name = judge.name
    # an endpoint judge: what the round's judging cost
    judge_usage = judge.client.usage() if hasattr(getattr(judge, "client", None), "usage") else None
    # training loads the checkpoint afresh; a self judge would otherwise keep the sampler's copy alive through it
    del pipeline, judge

    # train.num_ranks ranks, through the stages' launcher (one rank: in this process)
    train_summary = launch_srum_round(model_dir, candidates, srum_cfg, model_cfg, ckpt_dir, round_dir,
                                      train=train_cfg, progress=progress, live_metrics=live_metrics)

    globals_ = [r["vlm_rewards"][0]["score"] for r in records]
    regional = [e["score"] for r in records for e in r["vlm_rewards"][1:]]
    by_category: dict[str, list[float]] = {}
    for r in records:
        by_category.setdefault(str(r.get("category")), []).append(r["vlm_rewards"][0]["score"])
    summary = {
        "round": round_index,
        "judge": judge_name,
        "init_checkpoint": str(model_dir),
        "checkpoint": str(ckpt_dir),
        "prompts": len(prompts),
        "candidates_per_prompt": srum_cfg.candidates,
        "records": len(records),
        "seeds": seeds,
        "reward_stats": {
            **reward_stats(full_maps, [r["vlm_rewards"] for r in records]),
            "global_score_mean": float(np.mean(globals_)),
            "region_score_mean": float(np.mean(regional)) if regional else None,
            "regions_per_image": len(regional) / len(records),
        },
        "global_score_by_category": {c: float(np.mean(v)) for c, v in sorted(by_category.items())},
        "train": train_summary,
        "paths": {"round_dir": str(round_dir), "rewards": str(rewards_path), "reward_maps": str(maps_path),
                  "images": str(image_dir), "checkpoint": str(ckpt_dir)},
        "timings_s": {"generate": t_generate, "judge": t_judge, "train": train_summary.get("total_s"),
                      "total": time.perf_counter() - t0},
    }
    if judge_usage is not None:
        summary["judge_usage"] = judge_usage
    (round_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
