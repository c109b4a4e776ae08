"""Run a training stage on N ranks: in this process for one rank, under torchrun for more, on one machine or several.

Both ways write `out_dir/run_config.json` (every config resolved to JSON): the torchrun workers read it
(`python -m model.train_worker out_dir/run_config.json`), and it records how the stage was launched.

Several machines (`Topology`): train.nodes machines, each running train.num_ranks ranks; the same command runs on
every machine, which then differ only by their node rank. The number of machines, this machine's rank and the
rendezvous address come from params when set there, else from the environment a cluster sets (torchrun's PET_*
variables, the usual NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT, or SLURM's). One machine keeps the
standalone torchrun command. Machine 0 runs `run_stage` (`scone train`), which also publishes the result; the
others run `python -m model.launch <out_dir>/run_config.json` (`join_stage`), which only starts their workers.
`out_dir` must be on a filesystem every machine shares: global rank 0 (on any machine) writes the checkpoint and
the summary, every rank its DeepSpeed state, and machine 0's launcher reads the summary back.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import model
from model.config import ModelConfig, StageConfig, TrainConfig, check_endpoint
from model.engine import RANK_ENV
from model.train import DEFAULT_FAMILY, STATE_DIR, SUMMARY, check_settings, finished_summary, run_settings, train_stage

RUN_CONFIG = "run_config.json"
WORKER_LOG = "worker.log"
LOG_TAIL_LINES = 40
DEFAULT_MASTER_PORT = 29500  # torch.distributed's customary MASTER_PORT

# Where each setting is looked up when params leave it null, first match wins. PET_* are torchrun's own
# (it reads them for its flags); NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT are what job templates
# (Kubernetes operators, hand-written launch scripts) export; SLURM_* are set by srun / sbatch on every node.
NODES_ENV = ("PET_NNODES", "NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
NODE_RANK_ENV = ("PET_NODE_RANK", "NODE_RANK", "SLURM_NODEID")
NODELIST_ENV = ("SLURM_JOB_NODELIST", "SLURM_NODELIST")


class StageLaunchError(RuntimeError):
    """The torchrun workers of a stage failed; the message carries the tail of their log."""


class TopologyError(ValueError):
    """A multi-node launch lacks (or has contradictory) settings for this machine."""


@dataclass(frozen=True)
class Topology:
    """This machine's place in the run: `nodes` machines of `ranks_per_node` ranks each."""

    nodes: int
    node_rank: int
    ranks_per_node: int
    rdzv_endpoint: str | None  # None on one machine (standalone rendezvous)
    sources: tuple[tuple[str, str], ...] = ()  # (setting, where it came from), for messages

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1


def _env_int(env: Mapping[str, str], names: tuple[str, ...], what: str) -> tuple[int, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            if not value.isdigit():
                # e.g. PET_NNODES=1:4 (an elastic range): a stage's world size is fixed by its run settings
                raise TopologyError(f"{name}={value!r}: {what} must be a whole number")
            return int(value), name
    return None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[003-005,010],cpu01" -> "gpu003"), as `scontrol show hostnames`
    would list it first: SLURM sets no MASTER_ADDR, and its first node is where launch scripts put rank 0."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None or not head.group(1):
        raise TopologyError(f"SLURM node list {nodelist!r}: no host name in it")
    prefix, ranges = head.group(1), head.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first  # zero padding is part of the range's text ("003-005"), so it is kept


def _endpoint_from_env(env: Mapping[str, str]) -> tuple[str, str] | None:
    if env.get("PET_RDZV_ENDPOINT", "").strip():
        return env["PET_RDZV_ENDPOINT"].strip(), "PET_RDZV_ENDPOINT"
    port = env.get("MASTER_PORT", "").strip() or str(DEFAULT_MASTER_PORT)
    if env.get("MASTER_ADDR", "").strip():
        return f"{env['MASTER_ADDR'].strip()}:{port}", "MASTER_ADDR:MASTER_PORT"
    for name in NODELIST_ENV:
        if env.get(name, "").strip():
            return f"{first_slurm_host(env[name])}:{port}", f"first host of {name}"
    return None


def resolve_topology(train: TrainConfig, num_ranks: int | None = None,
                     env: Mapping[str, str] | None = None) -> Topology:
    """nodes, node_rank and rdzv_endpoint: a value set in params wins over the environment (`NODES_ENV`,
    `NODE_RANK_ENV`, then PET_RDZV_ENDPOINT, MASTER_ADDR[:MASTER_PORT], the first SLURM node); unset everywhere,
    one machine."""
    env = os.environ if env is None else env
    ranks = num_ranks or train.num_ranks
    sources: list[tuple[str, str]] = []

    if train.nodes is not None:
        nodes, where = train.nodes, "params"
    else:
        found = _env_int(env, NODES_ENV, "the number of nodes")
        nodes, where = found if found is not None else (1, "default")
    sources.append(("nodes", where))
    if nodes < 1:
        raise TopologyError(f"nodes must be >= 1, got {nodes} ({where})")

    if train.node_rank is not None:
        node_rank, where = train.node_rank, "params"
    else:
        found = _env_int(env, NODE_RANK_ENV, "the node rank")
        if found is None and nodes > 1:
            raise TopologyError(f"{nodes} nodes: this machine's node rank is unknown (set train.node_rank or one "
                                f"of {', '.join(NODE_RANK_ENV)})")
        node_rank, where = found if found is not None else (0, "default")
    sources.append(("node_rank", where))
    if node_rank >= nodes:
        raise TopologyError(f"node rank {node_rank} ({where}) is not below nodes {nodes}")

    endpoint = None
    if nodes > 1:
        if train.rdzv_endpoint is not None:
            endpoint, where = train.rdzv_endpoint, "params"
        else:
            found = _endpoint_from_env(env)
            if found is None:
                raise TopologyError(f"{nodes} nodes: no rendezvous address (set train.rdzv_endpoint, "
                                    "PET_RDZV_ENDPOINT or MASTER_ADDR/MASTER_PORT, or run under SLURM)")
            endpoint, where = found
            try:
                check_endpoint(endpoint)
            except ValueError as e:
                raise TopologyError(f"{e} (from {where})") from None
        sources.append(("rdzv_endpoint", where))
    return Topology(nodes, node_rank, ranks, endpoint, tuple(sources))


def _rel(path: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path.cwd())


def write_run_config(stage_name: str, stage: StageConfig, train: TrainConfig, model_cfg: ModelConfig,
                     data_root: str | Path, out_dir: str | Path, init_checkpoint: str | Path | None,
                     num_ranks: int, progress: bool = True, model_family: str = DEFAULT_FAMILY,
                     max_quarantine_fraction: float = 0.05, live_metrics: dict | None = None,
                     topology: Topology | None = None, rendezvous_id: str | None = None) -> Path:
    """`out_dir/run_config.json`. Every machine of a multi-node run writes it (atomically) with the same content:
    the node rank, the one setting they differ by, is left out (the workers get theirs from torchrun)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    topology = topology or Topology(1, 0, num_ranks, None)
    cfg = {
        "stage_name": stage_name,
        "stage": stage.model_dump(mode="json"),
        "train": train.model_copy(update={"node_rank": None}).model_dump(mode="json"),
        "model": model_cfg.model_dump(mode="json"),
        # relative to the launching directory, where torchrun starts the workers too: the file stays valid in a
        # moved or cloned checkout
        "data_root": _rel(data_root),
        "out_dir": _rel(out_dir),
        "init_checkpoint": _rel(init_checkpoint) if init_checkpoint else None,
        "num_ranks": num_ranks,
        "nodes": topology.nodes,
        "rdzv_endpoint": topology.rdzv_endpoint,
        "rdzv_id": rendezvous_id if topology.multi_node else None,
        "progress": progress,
        "model_family": model_family,
        "max_quarantine_fraction": max_quarantine_fraction,
        "live_metrics": live_metrics,
    }
    return write_config_file(out_dir / RUN_CONFIG, cfg)


def write_config_file(path: Path, cfg: dict) -> Path:
    """`cfg` as JSON at `path`, through a private name and a rename: another machine's workers may be reading the
    file right now."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, path)
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


TRAIN_WORKER = "model.train_worker"


def torchrun_command(run_config: Path, num_ranks: int, topology: Topology | None = None,
                     rdzv_id: str = "scone", worker: str = TRAIN_WORKER) -> list[str]:
    """One machine: a standalone rendezvous of `num_ranks` workers. Several: every machine's torchrun meets the
    others at the c10d rendezvous on `topology.rdzv_endpoint` under the id `rdzv_id` (the same on all of them).
    torchrun assigns the global ranks at the rendezvous; --node_rank names this machine (torchrun only uses it
    with a static rendezvous, and our log names use it)."""
    # `python -m torch.distributed.run` is torchrun, pinned to this interpreter
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if topology is None or not topology.multi_node:
        cmd += ["--standalone", f"--nproc_per_node={num_ranks}"]
    else:
        cmd += [f"--nnodes={topology.nodes}", f"--node_rank={topology.node_rank}", f"--nproc_per_node={num_ranks}",
                "--rdzv_backend=c10d", f"--rdzv_endpoint={topology.rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    return cmd + ["-m", worker, str(run_config)]


def rdzv_id(stage_name: str, env: Mapping[str, str] | None = None) -> str:
    """The rendezvous id all machines agree on: torchrun's PET_RDZV_ID, else the SLURM job, else the stage."""
    env = os.environ if env is None else env
    return env.get("PET_RDZV_ID") or (f"slurm-{env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID") else
                                      f"scone-{stage_name}")


def worker_log(out_dir: Path, topology: Topology) -> Path:
    """Machine 0 logs to out_dir/worker.log; machine K to ds_state/worker.nodeK.log, so that machines never
    append to one file over a shared filesystem, and the extra logs stay with the run's state (never published)."""
    if topology.node_rank == 0:
        return out_dir / WORKER_LOG
    state = out_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    return state / f"worker.node{topology.node_rank}.log"


# torchrun takes these as the defaults of the flags `torchrun_command` decides (PET_NNODES=2 would make a
# standalone launch wait for a second machine): the launcher has resolved them already (`resolve_topology`).
TORCHRUN_TOPOLOGY_ENV = ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_STANDALONE", "PET_RDZV_BACKEND",
                         "PET_RDZV_ENDPOINT", "PET_RDZV_ID", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def _worker_env(num_ranks: int) -> dict[str, str]:
    # torchrun assigns the rank variables per worker
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV and k not in TORCHRUN_TOPOLOGY_ENV}
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
    """Train `stage_name` on `num_ranks` ranks per machine (default train.num_ranks) on this machine and the
    others of `resolve_topology`, and return its summary. Run it on every machine of a multi-node run."""
    num_ranks = num_ranks or train.num_ranks
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    topology = resolve_topology(train, num_ranks)
    out_dir = Path(out_dir)
    # refused or finished runs are answered here, without touching out_dir or starting N interpreters
    check_settings(out_dir, run_settings(stage_name, stage, train, model_cfg, data_root, init_checkpoint,
                                         topology.world_size, model_family))
    done = finished_summary(out_dir)
    if done is not None:
        return done
    rendezvous = rdzv_id(stage_name)
    run_config = write_run_config(stage_name, stage, train, model_cfg, data_root, out_dir, init_checkpoint,
                                  num_ranks, progress, model_family, max_quarantine_fraction, live_metrics, topology,
                                  rendezvous)
    if topology.world_size == 1:
        return train_stage(**read_run_config(run_config))
    _run_torchrun(torchrun_command(run_config, num_ranks, topology, rendezvous), worker_log(out_dir, topology),
                  echo=progress, num_ranks=num_ranks)
    summary = out_dir / SUMMARY
    if not summary.exists():
        raise StageLaunchError(f"the workers finished but {summary} is not there: a multi-node run needs out_dir on "
                               "a filesystem every machine shares (global rank 0 may run on any of them)")
    return json.loads(summary.read_text())


def join_stage(run_config: str | Path, node_rank: int | None = None, *, wait_s: float = 600.0,
               progress: bool = True, env: Mapping[str, str] | None = None) -> Topology:
    """Add this machine's ranks to a multi-node stage that `run_stage` (`scone train`) runs on machine 0.

    Machine 0 resolves the settings, writes the run config and alone publishes the result (MLflow run,
    checkpoint); every other machine runs only its torchrun workers, from that run config (on the shared
    filesystem): the number of machines, ranks per machine, rendezvous address and id come from it, this
    machine's node rank from `node_rank` or the environment (NODE_RANK_ENV). Waits up to `wait_s` for machine 0
    to write the file. Returns the topology it joined with."""
    import time

    run_config = Path(run_config)
    deadline = time.monotonic() + wait_s
    while not run_config.exists():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{run_config}: not written within {wait_s:.0f} s (start `scone train` on node 0, "
                                    "with out_dir on a filesystem this machine shares)")
        time.sleep(2.0)
    cfg = json.loads(run_config.read_text())
    nodes = int(cfg.get("nodes") or 1)
    if nodes < 2 or not cfg.get("rdzv_endpoint"):
        raise TopologyError(f"{run_config} is a single-machine run: there is nothing to join")
    env = os.environ if env is None else env
    if node_rank is None:
        found = _env_int(env, NODE_RANK_ENV, "the node rank")
        if found is None:
            raise TopologyError("this machine's node rank is unknown (pass it, or set one of "
                                f"{', '.join(NODE_RANK_ENV)})")
        node_rank, where = found
    else:
        where = "argument"
    if not 0 < node_rank < nodes:
        raise TopologyError(f"node rank {node_rank} ({where}): joining machines are 1..{nodes - 1}, "
                            "machine 0 runs `scone train`")
    topology = Topology(nodes, node_rank, int(cfg["num_ranks"]), cfg["rdzv_endpoint"], (("node_rank", where),))
    out_dir = run_config.parent
    # a SRUM round's run config names its own worker (model.srum_launch)
    _run_torchrun(torchrun_command(run_config, topology.ranks_per_node, topology, cfg["rdzv_id"],
                                   cfg.get("worker", TRAIN_WORKER)),
                  worker_log(out_dir, topology), echo=progress, num_ranks=topology.ranks_per_node)
    return topology


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m model.launch",
                                 description="join a multi-node training stage from a machine other than node 0 "
                                             "(node 0 runs `scone train --stage NAME`)")
    ap.add_argument("run_config", help="the stage's run_config.json (artifacts/work/train/<stage>/run_config.json)")
    ap.add_argument("--node-rank", type=int, default=None, help="this machine's node rank (default: environment)")
    ap.add_argument("--wait", type=float, default=600.0, help="seconds to wait for node 0's run config")
    args = ap.parse_args(argv)
    join_stage(args.run_config, args.node_rank, wait_s=args.wait)


if __name__ == "__main__":
    main()
