"""Corrupted shard in our own layout: broken rows go to the quarantine parquet with reasons, the valid rows
are imported complete (metadata columns kept) and validate."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build import BASE, build_dataset
from data.config import DataConfig, DatasetSizes, QualityConfig
from data.formats import scone_s2i
from data.importer import import_dataset
from data.quarantine import read_quarantine


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q")
    cfg = DataConfig(root=str(tmp / "src"), rows_per_row_group=8, num_workers=1, sizes=DatasetSizes(base=24))
    build_dataset(BASE, cfg)
    path = scone_s2i.data_dir(cfg.root, BASE) / "part-00000.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[1]["image"][0] = b"garbage"
    rows[4]["instruction"] = ""
    rows[6]["subject_list"] = json.dumps([[] for _ in json.loads(rows[6]["subject_list"])])
    rows[9]["key"] = rows[2]["key"]
    pq.write_table(pa.Table.from_pylist(rows, schema=scone_s2i.SCHEMA), path, row_group_size=8)
    return tmp, rows


def test_broken_rows_are_quarantined_and_the_rest_imports(corrupted):
    tmp, rows = corrupted
    cfg = DataConfig(root=str(tmp / "data"), rows_per_row_group=8, quality=QualityConfig(max_quarantine_fraction=0.2))
    summary = import_dataset("scone-s2i", tmp / "src", cfg, BASE)["datasets"][BASE]
    assert (summary["rows"], summary["quarantined"]) == (20, 4) and summary["validation"]["success"]
    q = {r["key"]: r["reason"] for r in read_quarantine(cfg, BASE)}
    assert q[rows[1]["key"]] == "image 1 does not decode (UnidentifiedImageError)"
    assert q[rows[4]["key"]] == "empty instruction"
    assert q[rows[6]["key"]].startswith("reference 1: subject label without a subject phrase")
    assert q[rows[2]["key"]] == f"duplicate key {rows[2]['key']}"  # the second row with that key
    kept = scone_s2i.read_cases(cfg.root, BASE)  # metadata columns survive the import
    assert [c.key for c in kept] == [r["key"] for i, r in enumerate(rows) if i not in (1, 4, 6, 9)]


def test_threshold_fails_the_import(corrupted):
    from data.quarantine import DataQualityError

    tmp, _ = corrupted
    cfg = DataConfig(root=str(tmp / "strict"), rows_per_row_group=8)
    with pytest.raises(DataQualityError, match=r"4 of 24 rows quarantined \(16.7% > data.quality.max_quarantine_fraction=0.05\)"):
        import_dataset("scone-s2i", tmp / "src", cfg, BASE)
    assert len(read_quarantine(cfg, BASE)) == 4


def test_row_filter_checks_rgb_and_extra_rules():
    from PIL import Image

    from data.quarantine import RowFilter
    from data.render import encode_png

    rgb, rgba = encode_png(Image.new("RGB", (32, 32))), encode_png(Image.new("RGBA", (32, 32)))
    rows = [{"key": "a", "image": [rgb, rgb], "instruction": "x"}, {"key": "b", "image": [rgb, rgba], "instruction": "x"},
            {"key": "c", "image": [rgb, rgb], "instruction": "flagged"}]
    keep = RowFilter(2, 3, 32, extra=lambda row: ["labels: wrong"] if row["instruction"] == "flagged" else [])
    assert [r["key"] for r in keep(rows)] == ["a"]
    assert [(r["key"], why) for r, why in keep.bad] == [("b", "image 2 is RGBA, expected RGB"), ("c", "labels: wrong")]
