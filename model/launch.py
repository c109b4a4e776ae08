"""Run a training stage on N ranks: in this process for one rank, under torchrun for more.

Both ways write `out_dir/run_config.json` (every config resolved to JSON): the torchrun workers read it
(`python -m model.train_worker out_dir/run_config.json`), and it records how the stage was launched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import model
from model.config import ModelConfig, StageConfig, TrainConfig
from model.engine import RANK_ENV
from model.train import DEFAULT_FAMILY, SUMMARY, check_settings, finished_summary, run_settings, train_stage

RUN_CONFIG = "run_config.json"
WORKER_LOG = "worker.log"
LOG_TAIL_LINES = 40


class StageLaunchError(RuntimeError):
    """The torchrun workers of a stage failed; the message carries the tail of their log."""


def _rel(path: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path.cwd())


def write_run_config(stage_name: str, stage: StageConfig, train: TrainConfig, model_cfg: ModelConfig,
                     data_root: str | Path, out_dir: str | Path, init_checkpoint: str | Path | None,
                     num_ranks: int, progress: bool = True, model_family: str = DEFAULT_FAMILY,
                     max_quarantine_fraction: float = 0.05, live_metrics: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "stage_name": stage_name,
        "stage": stage.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "model": model_cfg.model_dump(mode="json"),
        # relative to the launching directory, where torchrun starts the workers too: the file stays valid in a
        # moved or cloned checkout
        "data_root": _rel(data_root),
        "out_dir": _rel(out_dir),
        "init_checkpoint": _rel(init_checkpoint) if init_checkpoint else None,
        "num_ranks": num_ranks,
        "progress": progress,
        "model_family": model_family,
        "max_quarantine_fraction": max_quarantine_fraction,
        "live_metrics": live_metrics,
    }
    path = out_dir / RUN_CONFIG
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def read_run_config(path: str | Path) -> dict:
    """The keyword arguments of `train_stage`, validated back into the config models."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: run config not found (model.launch.run_stage writes it)")
    cfg = json.loads(path.read_text())
    return {
        "stage_name": cfg["stage_name"],
        "stage": StageConfig.model_validate(cfg["stage"]),
        "train": TrainConfig.model_validate(cfg["train"]),
        "model_cfg": ModelConfig.model_validate(cfg["model"]),
        "data_root": cfg["data_root"],
        "out_dir": cfg["out_dir"],
        "init_checkpoint": cfg["init_checkpoint"],
        "progress": cfg["progress"],
        "model_family": cfg["model_family"],
        "max_quarantine_fraction": cfg.get("max_quarantine_fraction", 0.05),
        "live_metrics": cfg.get("live_metrics"),
    }


def torchrun_command(run_config: Path, num_ranks: int) -> list[str]:
    # `python -m torch.distributed.run` is torchrun, pinned to this interpreter
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_ranks}",
            "-m", "model.train_worker", str(run_config)]


def _worker_env(num_ranks: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}  # torchrun assigns these per worker
    repo = str(Path(model.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([repo, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    # torchrun only defaults this to 1 when unset; N ranks each with all cores would oversubscribe the CPU
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_ranks)))
    return env


def _run_torchrun(cmd: list[str], log_path: Path, echo: bool, num_ranks: int = 1) -> None:
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    with log_path.open("ab") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       env=_worker_env(num_ranks)) as proc:
        partial = b""
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            log.write(chunk)
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            if echo:  # whole lines through print, so an orchestrator that captures prints logs the workers too
                for ln in lines:
                    print(ln.decode(errors="replace").rsplit("\r", 1)[-1], flush=True)
            tail.extend(ln.decode(errors="replace").rsplit("\r", 1)[-1] for ln in lines)
        rc = proc.wait()
    if rc != 0:
        if partial:
            tail.append(partial.decode(errors="replace"))
        raise StageLaunchError(
            f"torchrun ({' '.join(cmd[3:])}) exited with status {rc}; full log: {log_path}\n"
            + "\n".join(f"  | {ln}" for ln in tail)
        )


def run_stage(stage_name: str, stage: StageConfig, train: TrainConfig, model_cfg: ModelConfig,
              data_root: str | Path, out_dir: str | Path, init_checkpoint: str | Path | None = None,
              num_ranks: int | None = None, progress: bool = True, *, model_family: str = DEFAULT_FAMILY,
              max_quarantine_fraction: float = 0.05, live_metrics: dict | None = None) -> dict:
    """Train `stage_name` on `num_ranks` ranks (default train.num_ranks) and return its summary."""
    num_ranks = num_ranks or train.num_ranks
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    out_dir = Path(out_dir)
    # refused or finished runs are answered here, without touching out_dir or starting N interpreters
    check_settings(out_dir, run_settings(stage_name, stage, train, model_cfg, data_root, init_checkpoint, num_ranks,
                                         model_family))
    done = finished_summary(out_dir)
    if done is not None:
        return done
    run_config = write_run_config(stage_name, stage, train, model_cfg, data_root, out_dir, init_checkpoint,
                                  num_ranks, progress, model_family, max_quarantine_fraction, live_metrics)
    if num_ranks == 1:
        return train_stage(**read_run_config(run_config))
    _run_torchrun(torchrun_command(run_config, num_ranks), out_dir / WORKER_LOG, echo=progress, num_ranks=num_ranks)
    return json.loads((out_dir / SUMMARY).read_text())
