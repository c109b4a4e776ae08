"""Importing downloaded data: the released Scone-S2I layout (foreign absolute info paths, no metadata
columns) and a SconeEval directory; broken rows are quarantined with reasons, the rest validates."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.config import DataConfig, QualityConfig
from data.formats import scone_s2i
from data.importer import import_dataset
from data.quarantine import DataQualityError, read_quarantine
from data.render import encode_png

RELEASED = pa.schema([("image", pa.list_(pa.binary())), ("instruction", pa.string())])


def png(colour, size=48):
    return encode_png(Image.new("RGB", (size, size), colour))


def released_layout(src: Path, name: str, n_good: int, broken: list[dict]) -> list[dict]:
    """Two shards of `name` as the release ships them: info keys are absolute paths of another machine."""
    rows = [{"image": [png((i, 0, 0)), png((0, i, 0))], "instruction": f"put the object from image 1 number {i}"} for i in range(n_good)]
    rows += broken
    shard_dir = src / "parquet_data" / name
    shard_dir.mkdir(parents=True)
    info = {}
    half = len(rows) // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        path = shard_dir / f"{name}_{k:04d}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=RELEASED), path, row_group_size=5)
        info[f"/mnt/cluster/user/scone/parquet_data/{name}/{path.name}"] = {"num_row_groups": pq.ParquetFile(path).num_row_groups}
    (src / "parquet_info").mkdir()
    (src / "parquet_info" / f"{name}.json").write_text(json.dumps(info))
    return rows


def cfg_at(tmp_path, fraction=0.2) -> DataConfig:
    return DataConfig(root=str(tmp_path / "artifacts" / "data"), rows_per_row_group=8, quality=QualityConfig(max_quarantine_fraction=fraction))


def test_released_layout_imports_with_one_broken_row_quarantined(tmp_path):
    src = tmp_path / "download"
    rows = released_layout(src, "scone_real", 19, [{"image": [b"\x89PNG broken", png("red")], "instruction": "put it here"}])
    cfg = cfg_at(tmp_path)
    out = import_dataset("scone-s2i", src, cfg, None)
    s = out["datasets"]["scone_real"]
    assert (s["rows"], s["quarantined"]) == (19, 1)
    assert s["validation"]["success"] and "passed" in s["validation"]["summary"]
    # info re-written relative to data.root, rows copied in order with their original columns only
    info = scone_s2i.read_info(cfg.root, "scone_real")
    assert all(not Path(k).is_absolute() and (Path(cfg.root) / k).is_file() for k in info)
    copied = list(scone_s2i.iter_rows(cfg.root, "scone_real"))
    assert [r["instruction"] for r in copied] == [r["instruction"] for r in rows[:19]]
    assert set(copied[0]) == {"image", "instruction"} and copied[3]["image"] == rows[3]["image"]
    q = read_quarantine(cfg, "scone_real")
    assert len(q) == 1 and q[0]["reason"].startswith("image 1 does not decode") and q[0]["instruction"] == "put it here"


def test_every_kind_of_bad_row_gets_its_reason_and_the_threshold_fails_the_import(tmp_path):
    src = tmp_path / "download"
    good = png("blue")
    broken = [
        {"image": [good], "instruction": "one image only"},
        {"image": [good, good], "instruction": "   "},
        {"image": [png((1, 2, 3)), png((3, 2, 1))], "instruction": "put the object from image 1 number 0"},  # not a duplicate: other images
        {"image": [png((0, 0, 0)), png((0, 0, 0))], "instruction": "put the object from image 1 number 0"},  # same as good row 0
    ]
    released_layout(src, "mixed", 6, broken)
    cfg = cfg_at(tmp_path, fraction=0.2)
    with pytest.raises(DataQualityError, match=r"3 of 10 rows quarantined \(30.0% > data.quality.max_quarantine_fraction=0.2\)"):
        import_dataset("scone-s2i", src, cfg, "mixed")
    reasons = sorted(r["reason"] for r in read_quarantine(cfg, "mixed"))
    assert reasons[0].startswith("1 images, expected 2..5") and reasons[1].startswith("duplicate key sha256:")
    assert reasons[2] == "empty instruction"


def test_subject_label_without_subject_is_quarantined(tmp_path):
    from data.quarantine import row_problems

    row = {"image": [png("red"), png("blue")], "instruction": "x", "subject_list": "[[]]", "subject_label": "[[1]]"}
    assert row_problems(row, min_images=2, max_images=5) == [
        "reference 1: subject label without a subject phrase (1 labels, 0 phrases)"
    ]


def test_sconeeval_directory_imports_and_validates(tmp_path):
    src = tmp_path / "SconeEval"
    (src / "images").mkdir(parents=True)
    lines = []
    for i in range(5):
        Image.new("RGB", (40, 40), (i * 40, 10, 10)).save(src / "images" / f"{i}_1.png")
        lines.append({"key": str(i), "task_type": "composition_single", "case_type": "1O", "instruction": f"draw {i}",
                      "input_images": [f"images/{i}_1.png"], "subject_list": [["the circle"]], "subject_label": [[1]]})
    lines[4]["input_images"] = ["images/missing.png"]
    (src / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = cfg_at(tmp_path, fraction=0.25)
    s = import_dataset("sconeeval", src, cfg)["datasets"]["sconeeval"]
    assert (s["rows"], s["quarantined"]) == (4, 1) and s["validation"]["success"]
    dest = Path(cfg.root) / "sconeeval"
    assert sorted(p.name for p in (dest / "images").iterdir()) == ["0_1.png", "1_1.png", "2_1.png", "3_1.png"]
    (q,) = read_quarantine(cfg, "sconeeval")
    assert q["key"] == "4" and "images/missing.png is missing" in q["reason"]


def test_bad_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Scone-S2I-57K layout"):
        import_dataset("scone-s2i", tmp_path, cfg_at(tmp_path))
    with pytest.raises(ValueError, match="unknown import kind 'hf'"):
        import_dataset("hf", tmp_path, cfg_at(tmp_path))
