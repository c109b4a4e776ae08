"""Handing a stage over between machines through the DVC remote, never through a shared local path.

The chain (CPU pool) pushes what it has built to the DVC remote and sends its `dvc.lock` along with the request;
the worker that trains (GPU pool, its own checkout of the same commit) takes that record, pulls the stage's
inputs, trains, records the stage, pushes the new checkpoint and answers with the stage's new `dvc.lock` entry.
The chain merges that entry and pulls the checkpoint: DVC's record travels with the data it describes, so both
sides agree on what is up to date.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import yaml

from tasks.freshness import dvc_errors, stage_target

LOCK = "dvc.lock"


def _repo(root: Path):
    from dvc.repo import Repo

    return Repo(str(root))


def _targets(root: Path, stages: list[str] | None, paths: list[str] | None) -> list[str] | None:
    """Stages and output paths as DVC resolves them from any working directory (None: everything)."""
    if stages is None and paths is None:
        return None
    return [stage_target(root, s) for s in stages or []] + [str(Path(root).resolve() / p) for p in paths or []]


def push(root: Path, *, stages: list[str] | None = None, paths: list[str] | None = None) -> None:
    """Upload the cached outputs of `stages` / `paths` (everything when neither) to the default DVC remote."""
    with dvc_errors("push"), _repo(root) as repo, contextlib.redirect_stdout(io.StringIO()):
        repo.push(targets=_targets(root, stages, paths))


def pull(root: Path, *, stages: list[str] | None = None, paths: list[str] | None = None) -> None:
    """Download and check out the outputs of `stages` and the outputs at `paths`."""
    if not stages and not paths:
        return
    with dvc_errors("pull"), _repo(root) as repo, contextlib.redirect_stdout(io.StringIO()):
        repo.pull(targets=_targets(root, stages, paths))


def stage_inputs(root: Path, stage: str) -> list[str]:
    """The outputs of other stages that `stage` reads: what a machine needs before it can run the stage."""
    def related(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")

    with dvc_errors(f"inputs of {stage}"), _repo(root) as repo:
        target = repo.stage.collect(stage_target(root, stage))[0]
        deps = [str(d.def_path) for d in target.deps]
        outs = {str(o.def_path) for s in repo.index.stages if s.addressing != target.addressing for o in s.outs}
    return sorted(o for o in outs if any(related(o, d) for d in deps))


def pull_inputs(root: Path, stage: str) -> list[str]:
    targets = stage_inputs(root, stage)
    pull(root, paths=targets)
    return targets


def read_lock(root: Path) -> str:
    path = Path(root) / LOCK
    return path.read_text() if path.exists() else "schema: '2.0'\nstages: {}\n"


def lock_entry(root: Path, stage: str) -> str:
    """One stage's record in dvc.lock, as YAML."""
    stages = (yaml.safe_load(read_lock(root)) or {}).get("stages") or {}
    if stage not in stages:
        raise KeyError(f"{Path(root) / LOCK} has no entry for {stage}: the stage was not recorded")
    return yaml.safe_dump({stage: stages[stage]}, sort_keys=False)


def merge_lock(root: Path, lock_yaml: str) -> list[str]:
    """Take the stage entries of `lock_yaml` into root's dvc.lock (theirs win); returns the stages merged."""
    incoming = yaml.safe_load(lock_yaml) or {}
    incoming = incoming.get("stages", incoming)
    if not isinstance(incoming, dict):
        raise ValueError("a dvc.lock handover must map stage names to their entries")
    tree = yaml.safe_load(read_lock(root)) or {}
    tree.setdefault("schema", "2.0")
    stages = tree.setdefault("stages", {}) or {}
    stages.update(incoming)
    tree["stages"] = stages
    (Path(root) / LOCK).write_text(yaml.safe_dump(tree, sort_keys=False))
    return list(incoming)
