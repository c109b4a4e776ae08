"""Bad input end to end: validation checks every dataset, names shard file, row and key, quarantines bad rows
within the threshold, and the trainer's loader reads exactly the clean rows (or fails naming the row)."""
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build import BASE, MULTI, SRUM, build_dataset
from data.config import DataConfig, DatasetSizes, QualityConfig
from data.formats import scone_s2i
from data.validate import DataValidationError, validate_all, validate_dataset
from model import data_loader
from model.batching import examples_from_rows
from model.data_loader import DataDecodeError

NAMES = (BASE, MULTI, SRUM)
ROWS = 24  # 8 rows per shard: three shards per dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "artifacts" / "data"
    cfg = DataConfig(root=str(root), rows_per_row_group=8, row_groups_per_file=1, num_workers=1,
                     sizes=DatasetSizes(base=ROWS, multi_candidate=ROWS, srum_prompts=7))
    for name in NAMES:
        build_dataset(name, cfg)
    return cfg


def copy_of(cfg: DataConfig, tmp_path: Path, **quality) -> DataConfig:
    root = tmp_path / "artifacts" / "data"
    shutil.copytree(cfg.root, root)
    return cfg.model_copy(update={"root": str(root), "quality": QualityConfig(**quality)})


def shard(name: str, part: int) -> str:
    return f"parquet_data/{name}/part-{part:05d}.parquet"


def edit_shard(cfg: DataConfig, name: str, part: int, edit) -> list[dict]:
    """Rewrite one shard through `edit(rows) -> rows`; returns the edited rows."""
    path = Path(cfg.root) / shard(name, part)
    rows = edit(pq.read_table(path).to_pylist())
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    return rows


def flip_bytes(png: bytes) -> bytes:
    """Byte-wise damage inside the compressed image data: the header still says PNG, decoding fails."""
    mid = len(png) // 2
    return png[:mid] + bytes(b ^ 0xFF for b in png[mid:mid + 16]) + png[mid + 16:]


def corrupt_image(cfg: DataConfig, name: str, part: int, index: int, image: int) -> str:
    """Damage image `image` (0-based) of row `index` of a shard; returns the row's key."""
    def edit(rows):
        rows[index]["image"][image] = flip_bytes(rows[index]["image"][image])
        return rows

    return edit_shard(cfg, name, part, edit)[index]["key"]


def load(cfg: DataConfig, name: str, **kw) -> list:
    data_loader.clear_cache()
    return data_loader.load_examples(cfg.root, [name], examples_from_rows, **kw)


def test_bad_rows_of_two_datasets_are_quarantined_and_every_clean_row_is_trained_on(built, tmp_path):
    cfg = copy_of(built, tmp_path)  # default threshold 0.05: 1 of 24 rows is within it
    base_key = corrupt_image(cfg, BASE, 1, 3, 0)
    multi_key = corrupt_image(cfg, MULTI, 2, 5, 1)

    reports = validate_all(NAMES, lambda n: validate_dataset(n, cfg))

    assert [r["success"] for r in reports] == [True, True, True]
    base, multi, _ = reports
    assert f"{shard(BASE, 1)}, row 3 (key {base_key}): image 1 does not decode" in base["summary"]
    assert f"{shard(MULTI, 2)}, row 5 (key {multi_key}): image 2 does not decode" in multi["summary"]
    assert "WARNING: 1 of 24 rows quarantined (4.2% <= data.quality.max_quarantine_fraction=0.05)" in base["summary"]
    qdir = tmp_path / "artifacts" / "validation" / "quarantine"
    for name, part, row, key in ((BASE, 1, 3, base_key), (MULTI, 2, 5, multi_key)):
        saved = json.loads((tmp_path / "artifacts" / "validation" / f"{name}.json").read_text())
        assert saved["success"] is True and saved["quarantine"]["keys"] == [key]
        quarantined = pq.read_table(qdir / f"{name}.parquet").to_pylist()
        assert [q["key"] for q in quarantined] == [key] and "does not decode" in quarantined[0]["reason"]
        # valid rows lost: 0 -- the trainer decodes every other row (no decode error: the bad one is skipped)
        assert data_loader.quarantined_rows(cfg.root, name) == {(shard(name, part), row, key)}
        examples = load(cfg, name, max_quarantine_fraction=0.0)
        assert len(examples) == ROWS - 1
        clean = [r["instruction"] for r in scone_s2i.iter_rows(cfg.root, name) if r["key"] != key]
        assert [e.instruction for e in examples] == clean
    assert not (qdir / f"{SRUM}.parquet").exists()


def test_validate_all_goes_on_after_failures_and_lists_every_dataset(built, tmp_path):
    cfg = copy_of(built, tmp_path, max_quarantine_fraction=0.0)  # no bad row is tolerated
    base_key = corrupt_image(cfg, BASE, 0, 1, 0)
    multi_key = corrupt_image(cfg, MULTI, 1, 2, 0)

    with pytest.raises(DataValidationError) as err:
        validate_all(NAMES, lambda n: validate_dataset(n, cfg))

    msg = str(err.value)
    assert msg.startswith("validation FAILED for 2 of 3 datasets:")
    for name, part, row, key in ((BASE, 0, 1, base_key), (MULTI, 1, 2, multi_key)):
        assert f"{shard(name, part)}, row {row} (key {key}): image 1 does not decode" in msg
        assert f"1 of 24 rows quarantined (4.2% > data.quality.max_quarantine_fraction=0)" in msg
        assert str(tmp_path / "artifacts" / "validation" / "quarantine" / f"{name}.parquet") in msg
        assert f"fix: rebuild it with `scone data build {name}`" in msg
    assert set(err.value.report["datasets"]) == {BASE, MULTI}
    # the dataset after the failing ones was still validated and reported
    assert json.loads((tmp_path / "artifacts" / "validation" / f"{SRUM}.json").read_text())["success"] is True


def test_a_column_dropped_from_one_shard_fails_naming_column_and_shard(built, tmp_path):
    cfg = copy_of(built, tmp_path, max_quarantine_fraction=0.5)  # a table-level failure fails at any threshold

    def drop_instruction(rows):
        return [{k: v for k, v in r.items() if k != "instruction"} for r in rows]

    edit_shard(cfg, BASE, 2, drop_instruction)
    with pytest.raises(DataValidationError) as err:
        validate_dataset(BASE, cfg)
    assert f"column 'instruction' is missing in {shard(BASE, 2)}" in str(err.value)
    assert f"fix: rebuild it with `scone data build {BASE}`" in str(err.value)
    assert not (tmp_path / "artifacts" / "validation" / "quarantine" / f"{BASE}.parquet").exists()
    with pytest.raises(ValueError, match=rf"dataset {BASE}, {shard(BASE, 2)}: missing column\(s\) \['instruction'\].*"
                                         rf"scone data build {BASE}"):
        load(cfg, BASE)


def test_rows_that_break_after_validation_are_quarantined_or_named(built, tmp_path):
    cfg = copy_of(built, tmp_path)
    validate_dataset(MULTI, cfg)  # clean: no quarantine list
    key = corrupt_image(cfg, MULTI, 1, 6, 1)  # breaks after validation, as a flaky disk would

    examples = load(cfg, MULTI, quarantine_dir=tmp_path / "train_quarantine")
    assert len(examples) == ROWS - 1
    written = pq.read_table(tmp_path / "train_quarantine" / f"{MULTI}.parquet").to_pylist()
    assert [(w["key"], w["_shard"], w["_row"]) for w in written] == [(key, shard(MULTI, 1), "6")]
    assert written[0]["reason"].startswith("image 2 does not decode (")

    with pytest.raises(DataDecodeError) as err:
        load(cfg, MULTI, max_quarantine_fraction=0.0)
    msg = str(err.value)
    assert msg.startswith(f"dataset {MULTI}, {shard(MULTI, 1)}, row 6 (key {key}): image 2 does not decode (")
    assert f"rebuild it with `scone data build {MULTI}`" in msg
    assert "1 of 24 rows unusable (4.2% > data.quality.max_quarantine_fraction=0" in msg


def test_validation_and_training_losses_add_up_against_the_threshold(built, tmp_path):
    cfg = copy_of(built, tmp_path)
    first = corrupt_image(cfg, BASE, 0, 0, 0)
    validate_dataset(BASE, cfg)  # 1 of 24 quarantined: passes
    second = corrupt_image(cfg, BASE, 2, 7, 1)  # another one breaks later: 2 of 24 lost > 0.05
    with pytest.raises(DataDecodeError, match=rf"(?s)row 7 \(key {second}\).*2 of 24 rows unusable .*1 quarantined by validation, 1 failing"):
        load(cfg, BASE)
    assert len(load(cfg, BASE, max_quarantine_fraction=0.1)) == ROWS - 2
    assert first != second


def test_cli_validate_exits_non_zero_with_the_combined_error(built, tmp_path, capsys):
    from flows.cli import main

    cfg = copy_of(built, tmp_path, max_quarantine_fraction=0.0)
    key = corrupt_image(cfg, BASE, 0, 2, 0)
    overrides = ["--set", f"data.root={cfg.root}", "--set", f"pipeline.artifacts={tmp_path / 'artifacts'}",
                 "--set", f"data.image_size={cfg.image_size}", "--set", "data.quality.max_quarantine_fraction=0.0"]
    assert main(["data", "validate", *overrides, BASE]) == 1
    err = capsys.readouterr().err
    assert "error: validation FAILED for 1 of 1 datasets:" in err
    assert f"{shard(BASE, 0)}, row 2 (key {key}): image 1 does not decode" in err


def test_the_pipeline_validates_datasets_as_mapped_prefect_tasks_and_names_every_failure(built, tmp_path):
    """flows.pipeline.validate_all: one mapped task run per dataset, side by side in threads sharing the GX
    project; the flow still fails with one error listing both broken datasets, and the clean one passed."""
    from types import SimpleNamespace

    from prefect import flow

    import flows.pipeline as pipeline

    cfg = copy_of(built, tmp_path, max_quarantine_fraction=0.0)
    base_key = corrupt_image(cfg, BASE, 0, 1, 0)
    multi_key = corrupt_image(cfg, MULTI, 1, 2, 0)
    params = SimpleNamespace(data=cfg)  # validation reads only the data section

    @flow
    def validate_flow():
        return pipeline.validate_all(params)

    original = pipeline.all_names
    pipeline.all_names = lambda: list(NAMES)
    try:
        with pytest.raises(DataValidationError) as err:
            validate_flow()
    finally:
        pipeline.all_names = original
    msg = str(err.value)
    assert msg.startswith("validation FAILED for 2 of 3 datasets:")
    assert base_key in msg and multi_key in msg
    clean = json.loads((tmp_path / "artifacts" / "validation" / f"{SRUM}.json").read_text())
    assert clean["success"] is True and Path(clean["data_docs"]).exists()
    index = Path(clean["data_docs"]).read_text()
    assert all(name in index for name in NAMES)  # one Data Docs site lists all three, none lost to a race
