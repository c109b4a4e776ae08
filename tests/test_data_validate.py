"""Great Expectations suites: pass on built data, fail readably on corrupted data."""
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.build import BASE, BENCH, DATASETS, MULTI, SRUM, build_all
from data.config import DataConfig, DatasetSizes
from data.render import encode_png
from data.validate import DataValidationError, validate_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("val") / "artifacts" / "data"
    cfg = DataConfig(root=str(root), rows_per_row_group=8, sizes=DatasetSizes(base=24, multi_candidate=16, bench_per_task=1, srum_prompts=7))
    build_all(cfg)
    return cfg


def copy_of(cfg: DataConfig, tmp_path: Path) -> DataConfig:
    root = tmp_path / "artifacts" / "data"
    shutil.copytree(cfg.root, root)
    return cfg.model_copy(update={"root": str(root)})


def rewrite_first_shard(cfg: DataConfig, name: str, edit) -> None:
    path = Path(cfg.root) / "parquet_data" / name / "part-00000.parquet"
    rows = pq.read_table(path).to_pylist()
    table = edit(rows)
    pq.write_table(table, path, row_group_size=8)


def test_every_built_dataset_passes_and_is_reported(built):
    for name in DATASETS:
        report = validate_dataset(name, built)
        assert report["success"] and "passed" in report["summary"]
        saved = json.loads((Path(built.root).parent / "validation" / f"{name}.json").read_text())
        assert saved["success"] is True and saved["gx_result"]["success"] is True
        assert saved["statistics"]["unsuccessful_expectations"] == 0


def test_corrupted_images_fail_with_keys_and_reasons(built, tmp_path):
    cfg = copy_of(built, tmp_path)
    tiny = encode_png(Image.new("RGB", (16, 16)))

    def corrupt(rows):
        rows[1]["image"][0] = b"not a png"
        rows[3]["image"][-1] = tiny
        return pa.Table.from_pylist(rows, schema=pq.read_schema(Path(cfg.root) / "parquet_data" / BASE / "part-00000.parquet"))

    rewrite_first_shard(cfg, BASE, corrupt)
    with pytest.raises(DataValidationError) as err:
        validate_dataset(BASE, cfg)
    msg = str(err.value)
    assert "validation FAILED, 1 of" in msg
    assert "expect_column_values_to_be_in_set(images_ok): 2 of 24 rows fail" in msg
    shard = f"parquet_data/{BASE}/part-00000.parquet"
    assert f"{shard}, row 1 (key base_000001): image 1 does not decode" in msg
    assert f"{shard}, row 3 (key base_000003): image 2 is 16x16 RGB, expected 32x32 RGB" in msg
    assert "2 of 24 rows quarantined (8.3% > data.quality.max_quarantine_fraction=0.05)" in msg
    assert f"fix: rebuild it with `scone data build {BASE}`" in msg
    saved = json.loads((tmp_path / "artifacts" / "validation" / f"{BASE}.json").read_text())
    assert saved["success"] is False and saved["failures"][0]["unexpected_count"] == 2


def test_missing_column_and_bad_labels_fail(built, tmp_path):
    cfg = copy_of(built, tmp_path)

    def drop_instruction(rows):
        for r in rows:
            del r["instruction"]
        rows[0]["subject_label"] = json.dumps([[1, 1, 0]] + json.loads(rows[0]["subject_label"])[1:])
        return pa.Table.from_pylist(rows)

    rewrite_first_shard(cfg, MULTI, drop_instruction)
    with pytest.raises(DataValidationError) as err:
        validate_dataset(MULTI, cfg)
    msg = str(err.value)
    assert "expect_column_to_exist(instruction): column 'instruction' is missing" in msg
    assert f"column 'instruction' is missing in parquet_data/{MULTI}/part-00000.parquet" in msg
    assert "labels_ok" in msg and "row 0 (key multi_000000): reference 1:" in msg
    # a table-level failure is not cured by quarantining rows
    assert not (tmp_path / "artifacts" / "validation" / "quarantine" / f"{MULTI}.parquet").exists()


def test_benchmark_with_a_missing_image_and_too_few_task_types_fails(built, tmp_path):
    cfg = copy_of(built, tmp_path)
    bench = Path(cfg.root) / BENCH
    lines = [json.loads(x) for x in (bench / "data.jsonl").read_text().splitlines()]
    (bench / lines[0]["input_images"][0]).unlink()
    (bench / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:-1]))  # drops the last task type
    with pytest.raises(DataValidationError) as err:
        validate_dataset(BENCH, cfg)
    msg = str(err.value)
    assert f"{BENCH}/data.jsonl, row 0 (key {lines[0]['key']}): image 1 does not decode" in msg
    assert "expect_column_distinct_values_to_contain_set(task_type)" in msg


def test_missing_dataset_fails_readably(built, tmp_path):
    cfg = built.model_copy(update={"root": str(tmp_path / "artifacts" / "data")})
    with pytest.raises(DataValidationError, match="srum_prompts: validation FAILED, .*prompts.jsonl not found"):
        validate_dataset(SRUM, cfg)
    assert (tmp_path / "artifacts" / "validation" / "srum_prompts.json").exists()
