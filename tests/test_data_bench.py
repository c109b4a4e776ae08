"""Parallel row rendering is byte-identical to one process; the data-build benchmark reports both."""
import hashlib
import json
import types
from pathlib import Path

import pytest

from data.build import MICO, MULTI, build_dataset
from data.config import DataConfig, DatasetSizes


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    sizes = DatasetSizes(multi_candidate=40, mico=30)
    one = DataConfig(root=str(tmp_path / "one"), rows_per_row_group=4, num_workers=1, sizes=sizes)
    two = one.model_copy(update={"root": str(tmp_path / "two"), "num_workers": 2})
    for name in (MULTI, MICO):
        a, b = build_dataset(name, one), build_dataset(name, two)
        assert a["rows"] == b["rows"] and a["case_type"] == b["case_type"]
    assert digest(Path(one.root)) == digest(Path(two.root)) and len(digest(Path(one.root))) > 4


@pytest.mark.slow
def test_bench_reports_rows_per_second(tmp_path):
    from benchmarks.data_build import run

    params = types.SimpleNamespace(data=DataConfig(rows_per_row_group=8, sizes=DatasetSizes(base=32)))
    result = run(params, tmp_path / "bench" / "data_build.json")
    assert json.loads((tmp_path / "bench" / "data_build.json").read_text()) == result
    assert result["identical"] and result["one_process"]["rows"] == result["all_cores"]["rows"] == 32
    assert result["one_process"]["workers"] == 1 and result["all_cores"]["workers"] == result["cores"]
    assert result["one_process"]["rows_per_s"] == pytest.approx(32 / result["one_process"]["seconds"], rel=0.01)
