"""Serve the scheduled pipeline deployment from this process (the embedded-default way to run prefect.yaml)."""
from __future__ import annotations

import yaml


def nightly_schedule(path: str = "prefect.yaml") -> str:
    """The cron of the `nightly` deployment, so `scone serve` and `prefect deploy` share one schedule."""
    spec = yaml.safe_load(open(path))
    for dep in spec["deployments"]:
        if dep["name"] == "nightly":
            return dep["schedules"][0]["cron"]
    raise KeyError(f"{path}: no deployment named 'nightly'")


def serve(params_path: str = "params.yaml") -> None:
    from flows.pipeline import scone_pipeline

    scone_pipeline.serve(
        name="nightly",
        cron=nightly_schedule(),
        parameters={"params_path": params_path, "dvc_commit": True},
        description="scone-ops whole chain, served locally",
    )
