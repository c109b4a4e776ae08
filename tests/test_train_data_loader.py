"""Sample order of stage training: deterministic, epoch-wise permutations, rank shards, resumable by position."""
import numpy as np
import pytest

from model import data_loader
from model.data_loader import DatasetNotFoundError, SampleOrder, Sharding, StageBatches
from test_train_fakes import examples_from_rows, DECODED, write_dataset


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = SampleOrder(10, seed=3)
    stream = order.indices(0, 30)
    for e in range(3):
        assert sorted(stream[10 * e:10 * (e + 1)]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])


def test_order_is_a_function_of_seed_only():
    a, b, c = SampleOrder(50, 7), SampleOrder(50, 7), SampleOrder(50, 8)
    np.testing.assert_array_equal(a.indices(0, 120), b.indices(0, 120))
    assert not np.array_equal(a.indices(0, 50), c.indices(0, 50))


def test_windows_read_anywhere_in_the_stream_agree_with_one_long_read():
    # resuming = reading from a later position; no hidden iterator state
    order = SampleOrder(7, seed=1)
    whole = order.indices(0, 40)
    fresh = SampleOrder(7, seed=1)
    np.testing.assert_array_equal(fresh.indices(13, 9), whole[13:22])  # crosses the epoch boundary at 14


def test_ranks_and_micro_steps_tile_the_global_batch_exactly_once():
    order = SampleOrder(100, seed=0)
    micro, accum, world = 3, 2, 4
    position = 2 * micro * accum * world  # third step
    seen = []
    for rank in range(world):
        sh = Sharding(micro, accum, world, rank)
        assert sh.global_batch == 24
        for m in range(accum):
            start, count = sh.window(position, m)
            seen.extend(order.indices(start, count))
    np.testing.assert_array_equal(sorted(seen), sorted(order.indices(position, 24)))
    assert len(set(seen)) == 24


def test_one_rank_with_accumulation_sees_the_chunks_of_many_ranks():
    # 2 ranks x 1 micro step and 1 rank x 2 micro steps consume the same chunks in the same slots
    order = SampleOrder(30, seed=5)
    two = [order.indices(*Sharding(4, 1, 2, r).window(8, 0)) for r in range(2)]
    one = [order.indices(*Sharding(4, 2, 1, 0).window(8, m)) for m in range(2)]
    for a, b in zip(two, one):
        np.testing.assert_array_equal(a, b)
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


def test_stage_batches_collate_the_rank_slice(tmp_path):
    write_dataset(tmp_path, "a", 6)
    ex = data_loader.load_examples(tmp_path, ["a"], examples_from_rows)
    batches = StageBatches(ex, lambda items: [e["key"] for e in items], seed=0, sharding=Sharding(2, 1, 2, 1))
    expected = SampleOrder(6, 0).indices(4 + 2, 2)  # step at position 4, rank 1 takes the second chunk
    assert batches.micro_batch(4, 0) == [f"a-{i:04d}" for i in expected]


def test_missing_dataset_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"dataset 'nope'.*parquet_info/nope.json.*scone data build nope"):
        data_loader.read_rows(tmp_path, "nope")


def test_shard_without_image_column_is_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "parquet_data" / "x").mkdir(parents=True)
    (tmp_path / "parquet_info").mkdir()
    pq.write_table(pa.table({"instruction": ["a"]}), tmp_path / "parquet_data" / "x" / "part-00000.parquet")
    (tmp_path / "parquet_info" / "x.json").write_text('{"parquet_data/x/part-00000.parquet": {"num_row_groups": 1}}')
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\]"):
        data_loader.read_rows(tmp_path, "x")
