"""Sample order of stage training: lanes over row groups, deterministic epochs, rank shares, resumable by position."""
import pytest

from model import data_loader
from model.data_loader import DatasetNotFoundError, LaneOrder, Sharding, StageBatches, StageIndex, deal
from test_train_fakes import examples_from_rows, DECODED, write_dataset


def _units(tmp_path, n=40, rows_per_file=8, lanes=1):
    write_dataset(tmp_path, "a", n, rows_per_file=rows_per_file)  # row groups of 4 rows
    return StageIndex(tmp_path, ["a"]).units(lanes)


def _rows(order: LaneOrder, start: int, count: int) -> list[tuple]:
    """(shard, row) at lane stream positions [start, start + count), from the blocks alone."""
    out = []
    for block in order.blocks(start):
        rows = [(u.shard, u.first_row + i) for u in block.units for i in range(u.lo, u.hi)]
        out += [rows[int(k)] for k in block.order]
        if block.position + len(block.order) >= start + count:
            break
    first = next(iter(order.blocks(start))).position
    return out[start - first:start - first + count]


def test_each_epoch_of_a_lane_is_a_permutation_and_epochs_differ(tmp_path):
    units = _units(tmp_path)
    order = LaneOrder(units, 1, 0, seed=3, window=2)
    stream = _rows(order, 0, 120)
    everything = sorted((u.shard, u.first_row + i) for u in units for i in range(u.lo, u.hi))
    for e in range(3):
        assert sorted(stream[40 * e:40 * (e + 1)]) == everything
    assert stream[:40] != stream[40:80]


def test_order_is_a_function_of_seed_only(tmp_path):
    units = _units(tmp_path)
    a, b, c = (LaneOrder(units, 1, 0, seed=s, window=2) for s in (7, 7, 8))
    assert _rows(a, 0, 100) == _rows(b, 0, 100)
    assert _rows(a, 0, 40) != _rows(c, 0, 40)


def test_reading_from_any_position_agrees_with_one_long_read(tmp_path):
    # resuming = reading from a later position; no hidden iterator state
    order = LaneOrder(_units(tmp_path, n=28), 1, 0, seed=1, window=3)
    whole = _rows(order, 0, 80)
    fresh = LaneOrder(order.units, 1, 0, seed=1, window=3)
    assert _rows(fresh, 13, 30) == whole[13:43]  # crosses the epoch boundary at 28


def test_lane_shares_of_an_epoch_are_disjoint_and_cover_every_row_once(tmp_path):
    units = _units(tmp_path, n=44, lanes=4)  # 11 row groups, the last of a file smaller
    for epoch in range(3):
        shares = deal([u.num_rows for u in units], 4, seed=0, epoch=epoch)
        flat = sorted(u for share in shares for u in share)
        assert flat == list(range(len(units)))
        loads = [sum(units[u].num_rows for u in share) for share in shares]
        assert max(loads) - min(loads) <= 4  # the next unit goes to the lightest lane
    assert deal([4] * 11, 4, 0, 0) != deal([4] * 11, 4, 0, 1)


def test_fewer_row_groups_than_lanes_are_cut_into_row_slices(tmp_path):
    write_dataset(tmp_path, "a", 4, rows_per_file=4)  # one row group
    units = StageIndex(tmp_path, ["a"]).units(3)
    assert [(u.group, u.lo, u.hi) for u in units] == [(0, 0, 1), (0, 1, 2), (0, 2, 4)]
    with pytest.raises(ValueError, match="4 rows, fewer than the 5 lanes"):
        StageIndex(tmp_path, ["a"]).units(5)


def test_one_rank_with_accumulation_serves_the_micro_batches_of_many_ranks(tmp_path):
    # 2 ranks x 1 micro step and 1 rank x 2 micro steps: the same lanes, so the same micro batches in the same slots
    write_dataset(tmp_path, "a", 30)
    index = StageIndex(tmp_path, ["a"])

    def keys(sharding, micro):
        batches = StageBatches(index, examples_from_rows, lambda ex: [e["key"] for e in ex], seed=5,
                               sharding=sharding)
        return [[batches.micro_batch(m) for m in range(sharding.grad_accum)][micro] for _ in range(5)]

    for r in range(2):
        assert keys(Sharding(4, 1, 2, r), 0) == keys(Sharding(4, 2, 1, 0), r)
    assert [Sharding(4, 1, 2, r).chunk(0) for r in range(2)] == [Sharding(4, 2, 1, 0).chunk(m) for m in range(2)]


def test_sharding_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 outside world of size 2"):
        Sharding(1, 1, 2, 2)


def test_datasets_are_concatenated_in_order_and_decoded_once(tmp_path):
    write_dataset(tmp_path, "a", 5, seed=1)
    write_dataset(tmp_path, "b", 3, seed=2)
    data_loader.clear_cache()
    before = DECODED["rows"]
    ex = data_loader.load_examples(tmp_path, ["a", "b"], examples_from_rows)
    assert [e["key"] for e in ex] == [f"a-{i:04d}" for i in range(5)] + [f"b-{i:04d}" for i in range(3)]
    again = data_loader.load_examples(tmp_path, ["b", "a"], examples_from_rows)
    assert DECODED["rows"] - before == 8  # the second call came from the cache
    assert [e["key"] for e in again][:3] == ["b-0000", "b-0001", "b-0002"]
    # a rebuilt dataset is read again
    write_dataset(tmp_path, "b", 4, seed=3, rows_per_file=2)
    assert len(data_loader.load_examples(tmp_path, ["b"], examples_from_rows)) == 4


def test_stage_batches_collate_the_lane_of_the_rank(tmp_path):
    write_dataset(tmp_path, "a", 6)
    index = StageIndex(tmp_path, ["a"])
    batches = StageBatches(index, examples_from_rows, lambda items: [e["key"] for e in items], seed=0,
                           sharding=Sharding(2, 1, 2, 1))
    # rank 1 of 2 reads lane 1 only: one of the two row groups (rows 0-3 or 4-5) each epoch
    order = LaneOrder(index.units(2), 2, 1, seed=0, window=4)
    expected = [f"a-{row:04d}" for _, row in _rows(order, 0, 4)]
    assert batches.micro_batch(0) + batches.micro_batch(0) == expected
    assert batches.state() == {"lanes": {1: 4}, "samples": 4}


def test_missing_dataset_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"dataset 'nope'.*parquet_info/nope.json.*scone data build nope"):
        StageIndex(tmp_path, ["nope"])


def test_shard_without_image_column_is_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "parquet_data" / "x").mkdir(parents=True)
    (tmp_path / "parquet_info").mkdir()
    pq.write_table(pa.table({"instruction": ["a"]}), tmp_path / "parquet_data" / "x" / "part-00000.parquet")
    (tmp_path / "parquet_info" / "x.json").write_text('{"parquet_data/x/part-00000.parquet": {"num_row_groups": 1}}')
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\]"):
        data_loader.load_examples(tmp_path, ["x"], examples_from_rows)  # the in-memory loader, reading rows
    with pytest.raises(ValueError, match=r"dataset x, parquet_data/x/part-00000.parquet: "
                                         r"missing column\(s\) \['image'\]"):
        StageIndex(tmp_path, ["x"])  # the trainer's index, from the footers, before any row is read
