"""A fresh clone of the working tree with a shrunken params.yaml, for the slow end-to-end and fault tests."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "data": {"sizes": {"base": 24, "multi_candidate": 24, "bench_per_task": 2, "srum_prompts": 7, "mico": 9, "mige_edit": 4,
                       "t2i_pretrain": 14, "und_pretrain": 16, "und_heldout": 4}},
    # the release the chain starts from: a tokenizer, a briefly trained autoencoder and ViT, fresh language model
    "model": {"bootstrap": {"autoencoder": {"steps": 4, "batch_size": 4},
                            "vit": {"steps": 3, "batch_size": 4, "images": 8, "heldout_images": 4}}},
    "train": {"micro_batch": 4, "save_every": 2, "stages": {
        "und_pretrain": {"steps": 3, "warmup_steps": 0},
        "stage1_step1": {"steps": 6, "warmup_steps": 1},
        "stage1_step2": {"steps": 3, "warmup_steps": 0},
        "stage2_step1": {"steps": 3, "warmup_steps": 0},
        "stage2_step2": {"steps": 3, "warmup_steps": 0},
    }},
    "srum": {"steps": 2, "candidates": 2, "warmup_steps": 0},
    "eval": {"rounds": 1, "scorings": 2, "sampling": {"steps": 3}},
    "registry": {"gate": {"min_overall": 0.0}},
}
# the generation checkpoints (scored on SconeEval, registered); und_pretrain before them is scored on understanding only
CHECKPOINTS = ["stage1_step1", "stage1_step2", "stage2_step1", "stage2_step2", "srum_round1"]


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def environment(dst: Path) -> dict:
    # PYTHONPATH: the clone's own packages, ahead of the editable install of the working tree, so an edit made in
    # the clone is the code that runs there
    env = {**os.environ, "PREFECT_HOME": str(dst / ".prefect"), "PYTHONPATH": str(dst),
           "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.invalid",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.invalid"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # an in-process training test of this pytest run leaves a torch.distributed rendezvous in os.environ (and its
    # port bound): a child `scone` must pick its own
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return env


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True, timeout: int = 1500) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def make_clone(dst: Path, overrides: dict | None = None) -> tuple[Path, dict]:
    """The working tree's tracked + untracked-not-ignored files, committed to a new git repo, small params."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith("tests/data/"):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    params = _merge(yaml.safe_load((dst / "params.yaml").read_text()), _merge(SMALL, overrides or {}))
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = environment(dst)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        run(cmd, dst, env)
    return dst, env


def kill_when(cmd: list[str], cwd: Path, env: dict, marker: str, delay_s: float = 0.0, timeout: int = 900) -> str:
    """Start `cmd` in its own process group, kill -9 the whole group once `marker` is in its output (+ delay);
    returns the output up to then. Fails if the command ends before the marker shows."""
    log = cwd / f".kill-{int(time.time() * 1000)}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while marker not in log.read_text():
                assert proc.poll() is None, f"{cmd} ended before {marker!r}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"{marker!r} never appeared"
                time.sleep(0.2)
            time.sleep(delay_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    log.unlink()
    return text


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM a server started with start_new_session=True (its whole process group), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
