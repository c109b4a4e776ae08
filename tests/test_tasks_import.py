"""`scone data import`: a downloaded Scone-S2I folder becomes a validated dataset; pipeline names are protected."""
import json
import shutil
from pathlib import Path

import pytest

from data.build import build_dataset
from flows.params import load_params
from tasks.datasets import import_step

ROOT = Path(__file__).resolve().parents[1]


def _released_copy(data_root: Path, dst: Path, new_name: str) -> Path:
    """The layout as downloaded: info keys are absolute paths of another machine."""
    (dst / "parquet_data").mkdir(parents=True)
    (dst / "parquet_info").mkdir()
    shutil.copytree(data_root / "parquet_data" / "scone_multi_candidate", dst / "parquet_data" / new_name)
    info = json.loads((data_root / "parquet_info" / "scone_multi_candidate.json").read_text())
    info = {f"/mnt/elsewhere/{k.replace('scone_multi_candidate', new_name)}": v for k, v in info.items()}
    (dst / "parquet_info" / f"{new_name}.json").write_text(json.dumps(info))
    return dst


def test_import_registers_a_validated_dataset_and_refuses_pipeline_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(ROOT / "params.yaml", ["data.root=data_root", "data.sizes.multi_candidate=16"])
    build_dataset("scone_multi_candidate", params.data)
    src = _released_copy(tmp_path / "data_root", tmp_path / "download", "real_multi")
    summary = import_step(params, "scone-s2i", str(src), track=False)
    ds = summary["datasets"]["real_multi"]
    assert ds["rows"] == 16 and ds["quarantined"] == 0 and ds["validation"]["success"]
    assert (tmp_path / "imports" / "download" / "parquet_info" / "real_multi.json").exists()
    assert (tmp_path / "data_root" / "parquet_data" / "real_multi").is_dir()

    clash = _released_copy(tmp_path / "data_root", tmp_path / "download2", "scone_multi_candidate")
    with pytest.raises(ValueError, match="belong to datasets the pipeline builds"):
        import_step(params, "scone-s2i", str(clash), track=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        import_step(params, "scone-s2i", str(tmp_path / "nowhere"), track=False)
