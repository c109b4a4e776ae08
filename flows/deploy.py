"""Serve the deployments of prefect.yaml from this process (the embedded-default way to run them).

Every scheduled deployment in prefect.yaml is served, with its schedule and parameters, by one runner that starts at most
one flow run at a time: the nightly chain and the weekly SRUM rounds write the same artifacts folder, so they
must never overlap (the artifacts lock in tasks/lock.py refuses a second writer in any case; this makes the
second one wait for its turn instead). With a work pool, `concurrency_limit: 1` in prefect.yaml does the same.
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


def nightly_schedule(path: str = "prefect.yaml") -> str:
    """The cron of the `nightly` deployment, so `scone serve` and `prefect deploy` share one schedule."""
    for dep in deployment_specs(path):
        if dep["name"] == "nightly":
            return dep["schedules"][0]["cron"]
    raise KeyError(f"{path}: no deployment named 'nightly'")


def _flow(entrypoint: str):
    path, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def serve(params_path: str = "params.yaml", path: str = "prefect.yaml") -> None:
    from prefect import serve as prefect_serve

    deployments = []
    for dep in deployment_specs(path):
        if not dep.get("schedules"):  # run on demand on a work pool (the GPU stage): not this local runner's job
            continue
        parameters = {**(dep.get("parameters") or {}), "params_path": params_path}
        crons = [s["cron"] for s in dep.get("schedules") or [] if "cron" in s]
        deployments.append(_flow(dep["entrypoint"]).to_deployment(
            name=dep["name"], cron=crons[0] if crons else None, parameters=parameters,
            description=dep.get("description"), concurrency_limit=dep.get("concurrency_limit"),
        ))
    prefect_serve(*deployments, limit=1)

