"""A SRUM round's training on N ranks, through the launcher the stages use (model.launch).

Generation and judging happen once, in the round's process; only the reward-weighted training spreads over ranks.
The candidates go to the workers as one file (`CANDIDATES`, numpy's npz, no pickles: arrays and strings only), and
the round's settings as a run config naming its own worker (`python -m model.srum_worker RUN_CONFIG`). One rank
trains in this process, as a one-rank stage does; more run under torchrun on this machine and the others of
`model.launch.resolve_topology` (another machine joins with `python -m model.launch <work dir>/srum_run_config.json`).
Global rank 0 writes the checkpoint and its summary into `out_dir`, which every machine must share.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from model.batching import Example
from model.config import ModelConfig, SrumConfig, TrainConfig
from model.launch import (StageLaunchError, _rel, _run_torchrun, rdzv_id, resolve_topology, torchrun_command,
                          worker_log, write_config_file)
from model.run_identity import SUMMARY
from model.srum_train import SrumCandidate, train_srum_round

CANDIDATES = "candidates.npz"
RUN_CONFIG = "srum_run_config.json"
WORKER = "model.srum_worker"


def save_candidates(candidates: Sequence[SrumCandidate | tuple], path: str | Path) -> Path:
    """Every candidate's prompt (instruction and references), image, reward map and ground-truth image in one npz,
    written aside and renamed into place."""
    cands = [SrumCandidate(*c) for c in candidates]
    arrays: dict[str, np.ndarray] = {
        "instructions": np.array([c.example.instruction for c in cands], dtype=str),
        "ref_counts": np.array([len(c.example.refs) for c in cands], dtype=np.int64),
    }
    for i, c in enumerate(cands):  # images of a round may differ in size (references especially): one key each
        arrays[f"image_{i}"] = np.asarray(c.image, dtype=np.uint8)
        arrays[f"reward_{i}"] = np.asarray(c.reward, dtype=np.float32)
        arrays[f"reference_{i}"] = np.asarray(c.reference, dtype=np.uint8)
        for j, ref in enumerate(c.example.refs):
            arrays[f"ref_{i}_{j}"] = np.asarray(ref, dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_candidates(path: str | Path) -> list[SrumCandidate]:
    """The candidates `save_candidates` wrote, in order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the round's candidates file is missing (model.srum_launch writes it)")
    with np.load(path, allow_pickle=False) as f:
        out = []
        for i, (instruction, n_refs) in enumerate(zip(f["instructions"], f["ref_counts"])):
            refs = [f[f"ref_{i}_{j}"] for j in range(int(n_refs))]
            out.append(SrumCandidate(Example(refs=refs, instruction=str(instruction)), f[f"image_{i}"],
                                     f[f"reward_{i}"], f[f"reference_{i}"]))
    return out


def write_srum_run_config(work_dir: Path, model_dir: Path, candidates: Path, srum_cfg: SrumConfig,
                          model_cfg: ModelConfig | None, train: TrainConfig | None, out_dir: Path, progress: bool,
                          live_metrics: dict | None, topology, rendezvous: str, num_ranks: int) -> Path:
    cfg = {
        "worker": WORKER,  # model.launch.join_stage starts this on the other machines
        "model_dir": _rel(model_dir),
        "candidates": _rel(candidates),
        "srum": srum_cfg.model_dump(mode="json"),
        "model": None if model_cfg is None else model_cfg.model_dump(mode="json"),
        "train": None if train is None else train.model_copy(update={"node_rank": None}).model_dump(mode="json"),
        "out_dir": _rel(out_dir),
        "progress": progress,
        "live_metrics": live_metrics,
        "num_ranks": num_ranks,
        "nodes": topology.nodes,
        "rdzv_endpoint": topology.rdzv_endpoint,
        "rdzv_id": rendezvous if topology.multi_node else None,
    }
    return write_config_file(work_dir / RUN_CONFIG, cfg)


def read_srum_run_config(path: str | Path) -> dict:
    """The keyword arguments of `model.srum_train.train_srum_round`, validated back into the config models."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: SRUM run config not found (model.srum_launch.launch_srum_round writes it)")
    cfg = json.loads(path.read_text())
    return {
        "model_dir": cfg["model_dir"],
        "candidates": load_candidates(cfg["candidates"]),
        "srum_cfg": SrumConfig.model_validate(cfg["srum"]),
        "model_cfg": None if cfg["model"] is None else ModelConfig.model_validate(cfg["model"]),
        "out_dir": cfg["out_dir"],
        "train": None if cfg["train"] is None else TrainConfig.model_validate(cfg["train"]),
        "progress": cfg["progress"],
        "live_metrics": cfg.get("live_metrics"),
    }


def launch_srum_round(model_dir: str | Path, candidates: Sequence[SrumCandidate | tuple], srum_cfg: SrumConfig,
                      model_cfg: ModelConfig | None, out_dir: str | Path, work_dir: str | Path, *,
                      train: TrainConfig | None = None, progress: bool = False,
                      live_metrics: dict | None = None) -> dict:
    """Train the round on train.num_ranks ranks per machine (one without `train`) and return its summary.

    `work_dir` keeps the candidates file, the run config and the workers' log (the round's folder)."""
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    num_ranks = train.num_ranks if train is not None else 1
    topology = resolve_topology(train, num_ranks) if train is not None else None
    if topology is None or topology.world_size == 1:
        return train_srum_round(model_dir, candidates, srum_cfg, model_cfg, out_dir, train=train, progress=progress,
                                live_metrics=live_metrics)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = save_candidates(candidates, work_dir / CANDIDATES)
    rendezvous = rdzv_id(f"srum-{Path(out_dir).name}")
    run_config = write_srum_run_config(work_dir, Path(model_dir), saved, srum_cfg, model_cfg, train, out_dir, progress,
                                       live_metrics, topology, rendezvous, num_ranks)
    if topology.multi_node:  # the folder is the round's staging folder: the other machines need its name
        print(f"SRUM round on {topology.nodes} machines: on each other machine run "
              f"`python -m model.launch {_rel(run_config)}` (with its node rank)", flush=True)
    _run_torchrun(torchrun_command(run_config, num_ranks, topology, rendezvous, WORKER),
                  worker_log(work_dir, topology), echo=progress, num_ranks=num_ranks)
    summary = out_dir / SUMMARY
    if not summary.exists():
        raise StageLaunchError(f"the SRUM workers finished but {summary} is not there: a multi-node round needs "
                               "its folders on a filesystem every machine shares")
    return json.loads(summary.read_text())
