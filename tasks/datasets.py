"""Build and validate the DVC-versioned datasets."""
from __future__ import annotations

from prefect import task

from tasks.paths import DATASETS


def all_names() -> list[str]:
    return list(DATASETS)


def build_step(params, name: str) -> dict:
    from data.build import build_dataset

    return build_dataset(name, params.data)


def validate_step(params, name: str) -> dict:
    from data.validate import validate_dataset

    return validate_dataset(name, params.data)


build_dataset_task = task(build_step, name="build_data", task_run_name="build-{name}")
validate_dataset_task = task(validate_step, name="validate_data", task_run_name="validate-{name}")
