"""Record what the Prefect pipeline produced in dvc.lock, so `dvc repro` afterwards finds everything up to date."""
from __future__ import annotations

import subprocess

from prefect import task


def dvc_commit_step(cwd: str = ".") -> str:
    proc = subprocess.run(["dvc", "commit", "--force", "--quiet"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"dvc commit failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return "dvc.lock updated"


dvc_commit_task = task(dvc_commit_step, name="dvc_commit")
