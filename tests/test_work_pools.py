"""Beyond one machine, through Prefect's own means: the chain on a `cpu` work pool, its training stages as the
`scone-train-stage/gpu` deployment on a `gpu` work pool, each worker in its own checkout, handing over through a
DVC remote (no shared local path). On this machine: a Prefect server, two process work pools, two workers."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from chain_clone import CHECKPOINTS, free_port, make_clone, run, stop_group

pytestmark = pytest.mark.slow


def _wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s:\n{log.read_text()[-3000:]}")


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_training_on_a_gpu_pool_hands_over_through_the_dvc_remote(tmp_path):
    remote = tmp_path / "dvc-remote"
    remote.mkdir()
    chain, env = make_clone(tmp_path / "chain-host")
    gpu, _ = make_clone(tmp_path / "gpu-host")
    params = yaml.safe_load((chain / "params.yaml").read_text())
    params["pipeline"]["train_deployment"] = "scone-train-stage/gpu"
    (chain / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    port = free_port()
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    for host in (chain, gpu):
        run(["dvc", "remote", "add", "-d", "storage", str(remote)], host, env)

    procs = []
    try:
        server_log = tmp_path / "server.log"
        procs.append(_start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp_path, env,
                            server_log))
        _wait_http(f"http://127.0.0.1:{port}/api/health", 120, procs[0], server_log)
        for pool in ("cpu", "gpu"):
            run(["prefect", "work-pool", "create", pool, "--type", "process"], chain, env)
        run(["prefect", "--no-prompt", "deploy", "--all"], chain, env)
        for pool, host in (("cpu", chain), ("gpu", gpu)):
            worker_env = {**env, "SCONE_OPS_ROOT": str(host), "PYTHONPATH": str(host)}
            procs.append(_start(["prefect", "worker", "start", "--pool", pool], host, worker_env,
                                tmp_path / f"worker-{pool}.log"))

        out = run(["prefect", "deployment", "run", "scone-pipeline/nightly", "--watch", "--watch-timeout", "1500"],
                  chain, env)
        assert "Completed" in out.stdout + out.stderr, out.stdout[-3000:]
    finally:
        for p in reversed(procs):
            stop_group(p)

    gpu_log = (tmp_path / "worker-gpu.log").read_text()
    for stage in CHECKPOINTS[:4]:
        # trained on the gpu host, in its own checkout; the chain host has it through the remote
        assert (gpu / "artifacts/checkpoints" / stage / "ema.safetensors").is_file(), gpu_log[-3000:]
        assert (chain / "artifacts/checkpoints" / stage / "ema.safetensors").read_bytes() == \
            (gpu / "artifacts/checkpoints" / stage / "ema.safetensors").read_bytes()
        assert not (chain / "artifacts/work/train" / stage).exists()
    assert "stage1_step1: step" in gpu_log  # the training progress reached the gpu worker's flow-run logs
    status = run(["dvc", "status", "--json"], chain, env).stdout
    assert json.loads(status[status.index("{"):]) == {}  # the chain's dvc.lock describes what it now holds
    con = sqlite3.connect(chain / "artifacts/mlflow.db")
    assert con.execute("select count(*) from model_versions").fetchone()[0] == len(CHECKPOINTS)
