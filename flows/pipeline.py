"""The whole chain as one Prefect flow: the stages of `dvc.yaml`, in its order, with DVC deciding what is stale.

build_data -> validate_data -> bootstrap (tokenizer, autoencoder, ViT, release) -> und_pretrain -> stage1_step1 -> stage1_step2 -> stage2_step1 (bridge) -> stage2_step2
-> srum rounds -> evaluate (each checkpoint; a stage's beside the next training) -> register + gate (each checkpoint,
in order) -> report

Each checkpoint of the training stages is scored while the next stage (or the SRUM rounds) trains
(`ScoringBesideTraining`): on a 2-core machine the second core scores instead of sitting idle. Training's kernels run
one thread per rank and release the GIL, in this process for one rank and under torchrun for more; neither side
draws from torch's global random state (every draw has its own generator), so scores and weights are those of a
one-at-a-time run (tests/test_faults.py compares them).

Each step asks DVC whether its stage is up to date (code, params and upstream outputs, as `dvc.yaml` lists them);
a stale step runs and, only then, its stage is recorded in dvc.lock (tasks.freshness). So `dvc repro` afterwards
re-runs nothing, and a code change re-runs exactly the stages that depend on that code, and what follows them.
The flow holds the artifacts lock (tasks.lock) from start to end: one chain writes an artifacts folder at a time.
"""
from __future__ import annotations

from pathlib import Path
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_run_artifacts
from flows.params import load_params
from flows.remote_stage import train_via_deployment
from flows.srum import srum_rounds
from tasks import freshness as fr
from tasks.atomic import clear_staging
from tasks.bootstrap import autoencoder_task, release_task, tokenizer_task
from tasks.bootstrap_vit import vit_task
from tasks.datasets import all_names, build_dataset_task, validate_dataset_task
from tasks.evaluate import evaluate_task
from tasks.lock import artifacts_lock
from tasks.paths import Paths, checkpoint_names
from tasks.register import register_all_task
from tasks.report import report_task
from tasks.train_stage import train_stage_task


def build_stale_datasets(ledger: fr.Ledger, params, log) -> None:
    """The datasets are independent: the stale ones build as mapped Prefect tasks, side by side; each stage is
    recorded once every build has succeeded (DVC takes one writer at a time)."""
    stale = [name for name in all_names() if ledger.stale(fr.BUILD_STAGES[name], log)]
    if not stale:
        return
    build_dataset_task.map(unmapped(params), stale).result()
    for name in stale:
        ledger.record(fr.BUILD_STAGES[name])


def validate_all(params) -> list[dict]:
    """Every dataset's suite as mapped Prefect tasks, side by side; after all have finished, one error naming every
    failure (shard, key, fix)."""
    from data.validate import validate_all as each_then_raise

    names = all_names()
    runs = validate_dataset_task.map(unmapped(params), names)
    return each_then_raise(names, results=[run.result for run in runs])


def bootstrap_release(ledger: fr.Ledger, params, log) -> None:
    """The release directory the first stage starts from: made in the chain for model.preset, unless model.release
    names one (a downloaded BAGEL-7B-MoT or Scone directory)."""
    if params.model.release:
        log.info("starting from the release directory %s (model.release); nothing to bootstrap", params.model.release)
        return
    steps = (tokenizer_task, autoencoder_task, vit_task, release_task)
    for stage, step in zip(fr.BOOTSTRAP_STAGES, steps):
        ledger.run_if_stale(stage, step, params, log=log)


@task(name="score_checkpoint", task_run_name="score-{name}", cache_policy=NO_CACHE)
def score_checkpoint(ledger: fr.Ledger, params, name: str):
    """Score `name` when DVC calls its evaluate stage stale, and record it (the ledger serialises DVC calls)."""
    return ledger.run_if_stale(fr.evaluate_stage(name), evaluate_task, params, name, log=get_run_logger())


class ScoringBesideTraining:
    """One checkpoint's scoring at a time in a Prefect worker thread, started after its stage is recorded and
    waited for before the next one starts. A scoring failure surfaces at that wait, after the training beside it
    has finished and been recorded; nothing finished is lost."""

    def __init__(self, ledger: fr.Ledger, params, enabled: bool):
        self.ledger, self.params, self.enabled = ledger, params, enabled
        self.pending = None
        self.started: set[str] = set()

    def start(self, name: str) -> None:
        if not self.enabled:
            return
        self.wait()
        self.pending = score_checkpoint.submit(self.ledger, self.params, name)
        self.started.add(name)

    def wait(self) -> None:
        """Block until the scoring in flight has finished; raise its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def settle(self) -> None:
        """On the way out after a failure: let the scoring in flight finish writing (it holds no lock of its own;
        the chain's artifacts lock must outlive it) without hiding the failure that brought us here."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


@flow(name="scone-pipeline", log_prints=True)
def scone_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, dvc_commit: bool = True) -> dict:
    log = get_run_logger()
    params = load_params(params_path, overrides)
    paths = Paths.from_params(params)
    ledger = fr.Ledger.for_run(Path.cwd(), params_path, overrides, record=dvc_commit)
    if not ledger.enabled:
        log.warning("every step recomputes and dvc.lock is left untouched: %s", ledger.reason)

    with artifacts_lock(paths.root, command="scone pipeline"):
        clear_staging(paths.root)  # what a killed run left; we are the only writer now
        build_stale_datasets(ledger, params, log)
        ledger.run_if_stale(fr.VALIDATE_STAGE, validate_all, params, log=log)
        bootstrap_release(ledger, params, log)
        scoring = ScoringBesideTraining(ledger, params, params.pipeline.score_beside_training)
        try:
            for stage in params.pipeline.stage_order:
                if params.pipeline.train_deployment:  # on another work pool, handed over through the DVC remote
                    if not ledger.enabled:
                        raise ValueError(f"pipeline.train_deployment needs the DVC record ({ledger.reason}): set it "
                                         f"in params.yaml and run without --set")
                    train_via_deployment(params.pipeline.train_deployment, params, stage, Path.cwd(), log)
                else:
                    ledger.run_if_stale(fr.train_stage(stage), train_stage_task, params, stage, log=log)
                scoring.start(stage)
            srum_rounds(params_path, overrides, record=dvc_commit)
            scoring.wait()
        finally:
            scoring.settle()
        for name in checkpoint_names(params):
            if name not in scoring.started:
                ledger.run_if_stale(fr.evaluate_stage(name), evaluate_task, params, name, log=log)
        ledger.run_if_stale(fr.REGISTER_STAGE, register_all_task, params, log=log)
        ledger.run_if_stale(fr.REPORT_STAGE, report_task, params, log=log)
        publish_run_artifacts(params)

    report = paths.report_page
    log.info("report: %s", report)
    return {"report": str(report), "checkpoints": checkpoint_names(params)}
