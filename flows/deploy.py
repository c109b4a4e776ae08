"""Serve the deployments of prefect.yaml from this process (the embedded-default way to run them).

Every deployment in prefect.yaml is served, with its schedule and parameters, by one of two runners:
- the chain runner takes the scheduled deployments and starts at most one flow run at a time: the nightly chain
  and the weekly SRUM rounds write the same artifacts folder, so they must never overlap (the artifacts lock in
  tasks/lock.py refuses a second writer in any case; this makes the second one wait for its turn instead);
- the on-demand runner takes the deployments without a schedule (the training stage a chain hands to
  `pipeline.train_deployment`), one at a time too. It has to be a runner of its own: a chain waiting for its
  stage's run inside a limit-1 runner would hold the only slot the stage needs.
With work pools, `concurrency_limit: 1` in prefect.yaml does the same.
"""
from __future__ import annotations

import importlib

import yaml


def deployment_specs(path: str = "prefect.yaml") -> list[dict]:
    spec = yaml.safe_load(open(path))
    deployments = spec.get("deployments") or []
    if not deployments:
        raise KeyError(f"{path}: no deployments")
    return deployments


def _flow(entrypoint: str):
    path, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def runner_groups(specs: list[dict]) -> dict[str, list[dict]]:
    """prefect.yaml's deployments split between the chain runner (scheduled) and the on-demand runner."""
    groups: dict[str, list[dict]] = {"chain": [], "on-demand": []}
    for dep in specs:
        groups["chain" if dep.get("schedules") else "on-demand"].append(dep)
    return {name: deps for name, deps in groups.items() if deps}


def _deployment(dep: dict, params_path: str):
    parameters = {**(dep.get("parameters") or {}), "params_path": params_path}
    crons = [s["cron"] for s in dep.get("schedules") or [] if "cron" in s]
    return _flow(dep["entrypoint"]).to_deployment(
        name=dep["name"], cron=crons[0] if crons else None, parameters=parameters,
        description=dep.get("description"), concurrency_limit=dep.get("concurrency_limit"),
    )


async def _serve_groups(groups: dict[str, list], runner_cls=None) -> None:
    import asyncio

    if runner_cls is None:
        from prefect.runner import Runner as runner_cls

    runners = []
    for name, deployments in groups.items():
        runner = runner_cls(name=f"scone-serve-{name}", limit=1, pause_on_shutdown=True)
        for deployment in deployments:
            await runner.aadd_deployment(deployment)
        runners.append(runner)
    await asyncio.gather(*(runner.start() for runner in runners))


def serve(params_path: str = "params.yaml", path: str = "prefect.yaml") -> None:
    import asyncio

    groups = {name: [_deployment(dep, params_path) for dep in deps]
              for name, deps in runner_groups(deployment_specs(path)).items()}
    for name, deployments in groups.items():
        print(f"serving ({name} runner, one run at a time): " + ", ".join(d.name for d in deployments))
    try:
        asyncio.run(_serve_groups(groups))
    except KeyboardInterrupt:
        print("stopped serving")

