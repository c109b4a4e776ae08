"""The one authority for "is this output up to date": DVC's stage graph (`dvc.yaml`) and its record (`dvc.lock`).

Each stage of `dvc.yaml` lists everything its outputs depend on: the code (the package folders the step imports,
kept complete by tests/test_freshness_deps.py), the params keys and the upstream outputs. `dvc repro` decides
with it natively; the Prefect pipeline asks the same question per step (`Ledger.changes`) and, after a step has
really been recomputed, records that one stage (`Ledger.record`, a `dvc commit` of the stage), so DVC's record
only ever describes outputs made from the inputs it names. The steps themselves never skip work on their own.

A pipeline run whose parameters are not exactly `params.yaml` (`--set` overrides, another params file) cannot
use that record: every step recomputes and nothing is recorded (`Ledger.disabled`).

DVC rewrites dvc.lock in place, so a kill -9 during a commit can leave it cut short, and then every later DVC call
fails on it. Before each commit the ledger keeps an atomic copy of the record as it was (`.dvc/tmp/dvc.lock.good`);
a ledger that finds dvc.lock unreadable puts that copy back and says so. Only the interrupted stage is lost from
the record, so that one step runs again; nothing already recorded is.

The pipeline scores a checkpoint in a second thread while the next stage trains, and both threads ask and record:
every DVC call of every ledger in the process goes through one lock (DVC's own repository lock is a file lock that
refuses a second holder instead of waiting).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path


class DvcError(RuntimeError):
    """A DVC call failed; the message carries DVC's own words."""


def train_stage(stage: str) -> str:
    return f"train@{stage}"


def evaluate_stage(name: str) -> str:
    # dvc.yaml scores training stages and SRUM rounds in two foreach groups, one per params list
    group = "evaluate_srum" if name.startswith("srum_round") else "evaluate"
    return f"{group}@{name}"


def srum_stage(index: int) -> str:
    # dvc.yaml's srum foreach runs over the srum.rounds mapping, keyed by round name
    return f"srum@srum_round{index}"


BUILD_STAGES = {
    "scone_single_candidate_base": "build_base",
    "scone_single_candidate_refined": "build_refined",
    "scone_multi_candidate": "build_multi_candidate",
    "t2i_pretrain": "build_t2i_pretrain",
    "und_pretrain": "build_und_pretrain",
    "und_heldout": "build_und_heldout",
    "sconeeval_bench": "build_sconeeval_bench",
    "srum_prompts": "build_srum_prompts",
    "mico": "build_mico",
    "mige_edit": "build_mige_edit",
    "mico_bench": "build_mico_bench",
    "mige_bench": "build_mige_bench",
}
VALIDATE_STAGE = "validate_data"
BOOTSTRAP_STAGES = ("bootstrap_tokenizer", "bootstrap_autoencoder", "bootstrap_vit", "bootstrap_release")
REGISTER_STAGE = "register"
REPORT_STAGE = "report"


@contextlib.contextmanager
def dvc_errors(what: str):
    from dvc.exceptions import DvcException

    dvc_log = logging.getLogger("dvc")
    level = dvc_log.level
    dvc_log.setLevel(logging.ERROR)  # DVC's progress chatter is not ours to print; its errors are
    try:
        yield
    except DvcException as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise DvcError(f"dvc {what} failed: {e}{cause}") from e
    finally:
        dvc_log.setLevel(level)


def stage_target(root: Path, stage: str) -> str:
    """DVC reads a bare stage name against the working directory's dvc.yaml; name the project's file instead."""
    return f"{Path(root).resolve() / 'dvc.yaml'}:{stage}"


LOCK_BACKUP = Path(".dvc") / "tmp" / "dvc.lock.good"
ONE_DVC_CALL = threading.RLock()  # re-entrant: record() heals the record inside its own turn


def lock_is_readable(path: Path) -> bool:
    """Whether `path` is a dvc.lock DVC can read, judged by DVC's own lockfile schema."""
    from dvc.exceptions import DvcException
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils import strictyaml

    try:
        strictyaml.load(str(path), COMPILED_LOCKFILE_SCHEMA)
    except (OSError, UnicodeDecodeError, DvcException):
        return False
    return True


def keep_copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` so that `dst` is always whole: written aside, synced, then renamed over."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


@dataclass
class Ledger:
    """Answers "must this stage run?" and records a recomputed stage, from the DVC project at `root`."""

    root: Path
    enabled: bool = True
    reason: str = ""

    @classmethod
    def for_run(cls, root: str | Path, params_path: str | Path, overrides: list[str] | None, record: bool = True) -> "Ledger":
        root = Path(root).resolve()
        if not record:
            return cls.disabled(root, "recording turned off (--no-dvc-commit)")
        if overrides:
            return cls.disabled(root, f"overrides {overrides} differ from params.yaml, which dvc.lock describes")
        if Path(params_path).resolve() != root / "params.yaml":
            return cls.disabled(root, f"{params_path} is not {root / 'params.yaml'}, which dvc.lock describes")
        if not (root / "dvc.yaml").exists():
            return cls.disabled(root, f"no dvc.yaml in {root}")
        return cls(root)

    @classmethod
    def disabled(cls, root: str | Path, reason: str) -> "Ledger":
        return cls(Path(root), enabled=False, reason=reason)

    def _repo(self):
        from dvc.repo import Repo

        return Repo(str(self.root))

    def heal_record(self) -> None:
        """Put back the last whole dvc.lock when an interrupted commit left it unreadable; fail with the fix
        when there is no copy to put back."""
        lock, backup = self.root / "dvc.lock", self.root / LOCK_BACKUP
        if not lock.exists() or lock_is_readable(lock):
            return
        if backup.exists() and lock_is_readable(backup):
            shutil.copyfile(lock, lock.with_name("dvc.lock.broken"))
            keep_copy(backup, lock)  # atomic: a kill here leaves the broken record or the whole one, never none
            logging.getLogger(__name__).warning(
                "dvc.lock was unreadable (a commit was interrupted); restored the record from before that commit "
                "(%s). The interrupted stage will run again; the broken file is kept as dvc.lock.broken.", backup)
            return
        raise DvcError(f"{lock} is unreadable and there is no whole copy at {backup} to restore: move dvc.lock "
                       "aside and rerun; every stage then recomputes once and is recorded afresh")

    def changes(self, stage: str) -> list:
        """What DVC sees changed for `stage` (empty: up to date). A disabled ledger sees everything changed."""
        if not self.enabled:
            return [f"not checked: {self.reason}"]
        with ONE_DVC_CALL:
            self.heal_record()
            with dvc_errors(f"status {stage}"), self._repo() as repo, contextlib.redirect_stdout(io.StringIO()):
                status = repo.status(targets=[stage_target(self.root, stage)])
        return [c for entries in status.values() for c in entries]

    def record(self, stage: str) -> None:
        """Record `stage`'s current deps, params and outputs in dvc.lock (and its outputs in the DVC cache).
        Call only right after the stage's step has recomputed its outputs."""
        if not self.enabled:
            return
        with ONE_DVC_CALL:
            self.heal_record()
            lock = self.root / "dvc.lock"
            if lock.exists():
                keep_copy(lock, self.root / LOCK_BACKUP)
            with dvc_errors(f"commit {stage}"), self._repo() as repo, contextlib.redirect_stdout(io.StringIO()):
                repo.commit(stage_target(self.root, stage), force=True)

    def stale(self, stage: str, log=None) -> bool:
        """Whether `stage` must run; says so (and why) on `log`, or on stdout without one."""
        changes = self.changes(stage)
        say = log.info if log is not None else print
        if not changes:
            say(f"{stage}: up to date (dvc.lock matches its code, params and inputs)")
        elif self.enabled:
            say(f"{stage}: running ({'; '.join(map(str, changes))[:300]})")
        return bool(changes)

    def run_if_stale(self, stage: str, step, *args, log=None):
        """Run `step(*args)` when `stage` is stale, then record the stage."""
        if not self.stale(stage, log):
            return None
        result = step(*args)
        self.record(stage)
        return result
