"""A training stage as its own deployment, so it can run on a GPU work pool while the chain runs elsewhere.

`train_stage_remote` is the flow a GPU worker runs, in its own checkout of the same commit: it adopts the chain's
`dvc.lock`, pulls the stage's inputs from the DVC remote, trains the stage when it is stale, records it, pushes
the checkpoint and leaves the stage's new `dvc.lock` entry as a Prefect artifact. `train_via_deployment` is the
chain's side: push, `run_deployment`, then merge the entry and pull the checkpoint (tasks/handover.py). Nothing
passes through a shared local path: only the DVC remote, the MLflow store and Prefect's API.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import Artifact, create_markdown_artifact

from flows.params import load_params
from tasks import freshness as fr
from tasks import handover
from tasks.lock import artifacts_lock
from tasks.paths import Paths
from tasks.train_stage import train_stage_task

FENCE = "```yaml"


@flow(name="scone-train-stage", log_prints=True)
def train_stage_remote(stage: str, lock_yaml: str, handover_key: str, params_path: str = "params.yaml") -> str:
    log = get_run_logger()
    root = Path.cwd()
    params = load_params(params_path)
    ledger = fr.Ledger.for_run(root, params_path, None)
    target = fr.train_stage(stage)
    with artifacts_lock(Paths.from_params(params).root, command=f"scone train-stage {stage} (remote)"):
        handover.merge_lock(root, lock_yaml)
        handover.pull_inputs(root, target)  # the data and the init checkpoint, as the chain made them
        ledger.run_if_stale(target, train_stage_task, params, stage, log=log)
        handover.push(root, stages=[target])
    entry = handover.lock_entry(root, target)
    create_markdown_artifact(key=handover_key, markdown=f"{FENCE}\n{entry}```\n",
                             description=f"dvc.lock entry of {target}, for the chain to merge")
    return handover_key


def train_via_deployment(deployment: str, params, stage: str, root: Path, log) -> None:
    """The chain's side of a remote stage; a no-op when DVC already calls the stage up to date."""
    from prefect.deployments import run_deployment

    target = fr.train_stage(stage)
    ledger = fr.Ledger(root)
    if not ledger.stale(target, log):
        return
    handover.push(root)
    key = f"train-lock-{stage.replace('_', '-')}-{uuid.uuid4().hex[:12]}"
    log.info("%s: handed to deployment %s", target, deployment)
    run = run_deployment(deployment, parameters={"stage": stage, "lock_yaml": handover.read_lock(root),
                                                 "handover_key": key}, timeout=None)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"{target}: deployment {deployment} ended in state {run.state and run.state.name} "
                           f"(flow run {run.id}); see its logs in the Prefect UI")
    artifact = Artifact.get(key)
    if artifact is None:
        raise RuntimeError(f"{target}: deployment {deployment} finished without its dvc.lock handover ({key})")
    entry = str(artifact.data).split(FENCE, 1)[1].rsplit("```", 1)[0]
    handover.merge_lock(root, entry)
    handover.pull(root, stages=[target])
    still = ledger.changes(target)
    if still:
        raise RuntimeError(f"{target}: after the handover DVC still sees changes ({still}); are both checkouts on "
                           f"the same commit and params.yaml?")
