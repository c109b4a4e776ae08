"""The file-backed Great Expectations project under validation/gx/: one suite, definition and Checkpoint per
dataset, updated in place; Data Docs built by the Checkpoint; only the latest results kept; no absolute paths."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data.build import BASE, SRUM, build_dataset
from data.config import DataConfig, DatasetSizes
from data.validate import gx_project_dir, validate_dataset


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    """A relative data root, as the CLI uses (artifacts/data under the working directory)."""
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(root="artifacts/data", rows_per_row_group=8, sizes=DatasetSizes(base=12, srum_prompts=7))
    for name in (BASE, SRUM):
        build_dataset(name, cfg)
    return cfg


def _names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.json"))


def test_one_suite_definition_and_checkpoint_per_dataset_reused_across_runs(cfg, tmp_path):
    for _ in range(2):
        reports = {name: validate_dataset(name, cfg) for name in (BASE, SRUM)}
    gx_dir = gx_project_dir(cfg)
    assert gx_dir == Path("artifacts/validation/gx")
    for folder in ("expectations", "validation_definitions", "checkpoints"):
        assert _names(gx_dir / folder) == sorted([BASE, SRUM]), folder
    checkpoint = json.loads((gx_dir / "checkpoints" / f"{BASE}.json").read_text())
    assert [a["type"] for a in checkpoint["actions"]] == ["update_data_docs"]
    config = yaml.safe_load((gx_dir / "great_expectations.yml").read_text())
    assert config["analytics_enabled"] is False
    assert list(config["fluent_datasources"]["scone-ops"]["assets"]) == [BASE, SRUM]

    # the store keeps the latest run of each dataset only, and so do the Data Docs
    results = sorted((gx_dir / "uncommitted" / "validations").rglob("*.json"))
    assert [p.relative_to(gx_dir / "uncommitted" / "validations").parts[:2] for p in results] == [
        (BASE, "all-rows"), (SRUM, "all-rows")]
    docs = gx_dir / "uncommitted" / "data_docs" / "local_site"
    assert len(list((docs / "validations").rglob("*.html"))) == 2
    index = (docs / "index.html").read_text()
    assert BASE in index and SRUM in index

    for name, report in reports.items():
        saved = json.loads((Path("artifacts/validation") / f"{name}.json").read_text())
        assert saved["data_docs"] == report["data_docs"] == str(docs / "index.html")
        assert saved["success"] and saved["gx_result"]["success"]

    # relocatable: nothing GX wrote names this machine's folder
    for f in gx_dir.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yml", ".html"):
            assert str(tmp_path) not in f.read_text(errors="ignore"), f


def test_a_quarantine_keeps_both_runs_and_a_missing_dataset_drops_its_results(cfg):
    path = Path(cfg.root) / "parquet_data" / BASE / "part-00000.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[0]["instruction"] = ""  # one bad row of 12: quarantined, the clean rows validated again
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path, row_group_size=8)
    report = validate_dataset(BASE, cfg.model_copy(update={"quality": cfg.quality.model_copy(
        update={"max_quarantine_fraction": 0.5})}))
    assert report["success"] and report["quarantine"]["rows"] == 1
    runs = {p.name for p in (gx_project_dir(cfg) / "uncommitted" / "validations" / BASE).iterdir()}
    assert runs == {"all-rows", "clean-rows"}

    validate_dataset(SRUM, cfg)
    (Path(cfg.root) / SRUM / "prompts.jsonl").unlink()
    with pytest.raises(Exception, match="not found"):
        validate_dataset(SRUM, cfg)
    assert not (gx_project_dir(cfg) / "uncommitted" / "validations" / SRUM).exists()
    index = (gx_project_dir(cfg) / "uncommitted" / "data_docs" / "local_site" / "index.html").read_text()
    assert f"{SRUM}/" not in index and f"{BASE}/" in index
