"""Build and validate the DVC-versioned datasets.

A dataset is built under a staging data root and its files (shards + index, or the benchmark / prompt folder,
and its build quarantine) replace the old ones only when the build has succeeded.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from tasks.atomic import publish, replace_path, staged, write_json
from tasks.paths import DATASETS, Paths

if TYPE_CHECKING:  # a type only: the root params pull in every package's config
    from tasks.params import Params


def all_names() -> list[str]:
    return list(DATASETS)


def dataset_outputs(name: str) -> list[str]:
    """The paths (relative to the data root) that building `name` writes."""
    from data.catalog import BENCH, HELDOUT_BENCHES, S2I_DATASETS, SRUM

    if name in S2I_DATASETS:
        return [f"parquet_data/{name}", f"parquet_info/{name}.json"]
    if name in (BENCH, SRUM, *HELDOUT_BENCHES):
        return [name]
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def _staged_config(cfg, tmp: Path):
    """The data config with its root in staging; the LLM answer cache stays where it lives (not rebuilt)."""
    from data.llm_writer import default_cache_dir

    llm = cfg.llm.model_copy(update={"cache_dir": str(default_cache_dir(cfg))})
    return cfg.model_copy(update={"root": str(tmp), "llm": llm})


def build_step(params: Params, name: str) -> dict:
    from data.build import build_dataset

    paths = Paths.from_params(params)
    outputs = dataset_outputs(name)
    with staged(paths.root, f"data-{name}") as tmp:
        summary = build_dataset(name, _staged_config(params.data, tmp))
        publish([(tmp / rel, paths.data / rel) for rel in outputs])
        quarantine = Path("quarantine") / f"{name}.parquet"
        if (tmp / quarantine).exists():
            replace_path(tmp / quarantine, paths.data / quarantine)
        else:  # a clean build leaves no quarantine of an older one behind
            (paths.data / quarantine).unlink(missing_ok=True)
    summary["files"] = [str(paths.data / Path(f).relative_to(tmp)) for f in summary.get("files", [])]
    return summary


def validate_step(params: Params, name: str) -> dict:
    """Great Expectations suite, then the data card (counts, size histogram, lengths, contact sheet)."""
    from data.card import write_card
    from data.quarantine import validation_quarantine_path
    from data.validate import validate_dataset

    summary = validate_dataset(name, params.data)
    # The training stages depend on the quarantine folder, not on the reports (whose timings differ on every
    # run); an index per dataset, written even when nothing was quarantined, keeps the folder a real, never-empty
    # output that DVC restores on checkout and pull.
    quarantine = summary.get("quarantine") or {}
    write_json(validation_quarantine_path(params.data.root, name).with_suffix(".json"),
               {"dataset": name, "rows": quarantine.get("rows", 0), "keys": quarantine.get("keys", [])})
    summary["card"] = write_card(name, params.data)
    return summary


build_dataset_task = task(build_step, name="build_data", task_run_name="build-{name}")
validate_dataset_task = task(validate_step, name="validate_data", task_run_name="validate-{name}")


def import_step(params: Params, kind: str, src: str, name: str | None = None, track: bool = True) -> dict:
    """Register a downloaded dataset (Scone-S2I-57K or SconeEval layout): the raw copy is DVC-tracked under
    imports/<name> (its .dvc file goes into git), the cleaned, validated copy lands under params.data.root."""
    import shutil
    import subprocess
    from pathlib import Path

    from data.importer import import_dataset

    src_path = Path(src)
    if not src_path.is_dir():
        raise FileNotFoundError(f"{src}: not a directory (pass the folder holding parquet_data/ + parquet_info/, "
                                f"or data.jsonl + images for SconeEval)")
    incoming = [name] if name else [p.stem for p in (src_path / "parquet_info").glob("*.json")] or [src_path.name]
    clash = sorted(set(incoming) & set(DATASETS))
    if clash:
        raise ValueError(f"{src}: dataset name(s) {clash} belong to datasets the pipeline builds; rename "
                         f"parquet_info/<name>.json and parquet_data/<name>/ in the download (e.g. real_<name>), "
                         f"then list the new name in params.yaml train.stages.<stage>.datasets")
    raw = Path("imports") / src_path.name
    raw.parent.mkdir(parents=True, exist_ok=True)
    if src_path.resolve() != raw.resolve():
        if raw.exists():
            raise FileExistsError(f"{raw} exists: pick another --name or remove it (and {raw}.dvc) first")
        if track:
            proc = subprocess.run(["dvc", "add", str(src_path), "-o", str(raw)], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"dvc add {src_path} -o {raw} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        else:
            raw.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src_path, raw)
    summary = import_dataset(kind, raw, params.data, name)
    summary["raw_copy"] = str(raw)
    summary["dvc_file"] = f"{raw}.dvc" if track else None
    return summary
