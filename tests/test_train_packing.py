"""Token-budget packing and streamed, rank-sharded reading of stage data (model.data_loader), alone and through the
trainer: budgets, epochs, resume, the ranks' row groups, DataLoader workers, memory, rows that do not decode."""
import dataclasses
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data.formats.scone_s2i import write_rows
from data.quarantine import validation_quarantine_path, write_quarantine
from model.data_loader import DataDecodeError, DecodeLedger, Sharding, StageBatches, StageIndex
from model.launch import run_stage
from model.train import train_stage
from test_train_fakes import FAKE, FakeScone, examples_from_rows, tiny_configs

SIDE = 4


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(root, n: int, *, rows_per_row_group: int = 4, rows_per_file: int = 8, bad=()):
    """Rows of test_train_fakes' kind (the target is the reference mirrored); rows in `bad` have a broken reference."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        ref = rng.integers(0, 256, (SIDE, SIDE, 3))
        rows.append({"image": [b"not a png" if i in bad else _png(ref), _png(ref[:, ::-1])],
                     "instruction": f"mirror {i}", "key": f"fake-{i:04d}"})
    write_rows(rows, root, "fake", rows_per_row_group, rows_per_file)


def _tokens(example) -> int:
    return 2 + int(example["key"][-4:]) % 4  # 2 to 5 tokens


def _keys(examples) -> list[str]:
    return [e["key"] for e in examples]


def _batches(root, *, world=1, rank=0, accum=1, micro=4, budget=None, window=2, workers=0, fraction=0.05,
             examples=examples_from_rows):
    return StageBatches(StageIndex(root, ["fake"]), examples, _keys, seed=0,
                        sharding=Sharding(micro, accum, world, rank), max_tokens=budget,
                        sample_tokens=_tokens if budget else None, window=window, num_workers=workers,
                        max_quarantine_fraction=fraction)


def _steps(batches: StageBatches, steps: int) -> list[list[list[str]]]:
    return [[batches.micro_batch(m) for m in range(batches.sharding.grad_accum)] for _ in range(steps)]


def test_packed_micro_batches_fill_the_budget_and_use_every_sample_once_per_epoch(tmp_path):
    _write(tmp_path, 48)
    batches = _batches(tmp_path, budget=11)
    packs = [batches.take(0) for _ in range(40)]
    for pack, following in zip(packs, packs[1:]):
        used = sum(e.tokens for e in pack)
        assert used <= 11 and used + following[0].tokens > 11  # full: the next sample did not fit
    assert len({len(p) for p in packs}) > 1  # the budget decides, not a count
    served = [e for pack in packs for e in pack]
    assert [e.position for e in served] == list(range(len(served)))  # in lane order, nothing left out
    assert len(served) > 2 * 48 and batches.samples == len(served)
    for epoch in range(2):
        assert sorted(e.key for e in served[48 * epoch:48 * (epoch + 1)]) == [f"fake-{i:04d}" for i in range(48)]


def test_a_sample_larger_than_the_budget_is_an_error_naming_it_and_the_setting(tmp_path):
    _write(tmp_path, 16)
    batches = _batches(tmp_path, budget=4)  # rows 3, 7, 11 and 15 take 5 tokens
    with pytest.raises(ValueError, match=r"dataset fake, parquet_data/fake/part-0000[01]\.parquet, row [37] \(key "
                                         r"fake-00(03|07|11|15)\) takes 5 tokens, more than "
                                         r"train\.max_tokens_per_micro_batch=4"):
        for _ in range(16):
            batches.take(0)


def test_a_resumed_stream_serves_the_micro_batches_of_an_uninterrupted_one(tmp_path):
    _write(tmp_path, 40)  # 10 row groups: 5 per lane and epoch
    whole = _steps(_batches(tmp_path, accum=2, budget=11, window=3), 12)
    killed = _batches(tmp_path, accum=2, budget=11, window=3)
    head = _steps(killed, 5)
    state = killed.state()
    killed.close()
    assert all(p % 20 for p in state["lanes"].values())  # mid-epoch on both lanes
    resumed = _batches(tmp_path, accum=2, budget=11, window=3, workers=2)  # other workers, same batches
    resumed.restore([state["lanes"][0], state["lanes"][1]])
    assert head + _steps(resumed, 7) == whole
    resumed.close()


def test_two_loader_workers_serve_the_batches_of_none(tmp_path):
    _write(tmp_path, 40)

    def run(workers):
        batches = _batches(tmp_path, accum=2, budget=11, window=2, workers=workers)
        out = _steps(batches, 15), batches.state()
        batches.close()
        return out

    assert run(0) == run(2)


def test_two_ranks_read_disjoint_row_groups_that_cover_the_dataset(tmp_path, monkeypatch):
    _write(tmp_path, 48)  # 12 row groups of 4 rows
    reads: list[tuple[str, int]] = []

    class Recorded(pq.ParquetFile):
        def __init__(self, source, **kw):
            super().__init__(source, **kw)
            self.source = str(source)

        def read_row_group(self, i, *a, **kw):
            reads.append((self.source, i))
            return super().read_row_group(i, *a, **kw)

    monkeypatch.setattr(pq, "ParquetFile", Recorded)
    read, served = [], []
    for rank in range(2):
        reads.clear()
        batches = _batches(tmp_path, world=2, rank=rank, micro=4)
        share = sum(batches.orders[rank].sizes[u] for u in batches.orders[rank].share(0))
        assert share == 24  # the dealing balances the lanes
        served.append([k for _ in range(share // 4) for k in batches.micro_batch(0)])  # its lane's epoch 0
        assert len(reads) == len(set(reads)) == 6  # each of its row groups read once
        read.append(set(reads))
    assert not read[0] & read[1]
    files = sorted((tmp_path / "parquet_data" / "fake").glob("*.parquet"))
    assert read[0] | read[1] == {(str(f), g) for f in files for g in range(2)}
    assert sorted(served[0] + served[1]) == [f"fake-{i:04d}" for i in range(48)]


class Counted(dict):
    """A decoded example that counts how many of its kind are alive."""

    alive = peak = 0

    def __init__(self, example):
        super().__init__(example)
        Counted.alive += 1
        Counted.peak = max(Counted.peak, Counted.alive)

    def __del__(self):
        Counted.alive -= 1


def _counted_examples(rows):
    return [Counted(e) for e in examples_from_rows(rows)]


def test_decoded_rows_held_at_once_stay_within_a_block_and_a_micro_batch(tmp_path):
    _write(tmp_path, 64)
    Counted.alive = Counted.peak = 0
    batches = _batches(tmp_path, micro=4, window=2, examples=_counted_examples)  # blocks of 2 x 4 rows
    served = [k for _ in range(20) for k in batches.micro_batch(0)]
    assert len(set(served[:64])) == 64  # the whole dataset went through
    assert Counted.peak <= 8 + 4  # one decoded block and the micro batch being assembled, never the dataset
    batches.close()


def test_streamed_rows_skip_validation_quarantine_and_left_out_decode_failures_are_named(tmp_path):
    _write(tmp_path, 24, bad={5})  # row 5 of part-00000 does not decode
    write_quarantine([({"key": "fake-0010", "_shard": "parquet_data/fake/part-00001.parquet", "_row": 2,
                        "instruction": "mirror 10"}, "validation found it")], None, "fake",
                     path=validation_quarantine_path(tmp_path, "fake"))

    batches = _batches(tmp_path, micro=2, fraction=0.1)  # 2 of 24 rows lost: 8.3%, within 10%
    served = [k for _ in range(11) for k in batches.micro_batch(0)]
    assert sorted(served) == [f"fake-{i:04d}" for i in range(24) if i not in (5, 10)]  # the epoch's usable rows
    batches.ledger.write(tmp_path / "quarantine")
    written = pq.read_table(tmp_path / "quarantine" / "fake.parquet").to_pylist()
    assert [(w["key"], w["_shard"], w["_row"]) for w in written] == [
        ("fake-0005", "parquet_data/fake/part-00000.parquet", "5")]
    assert written[0]["reason"].startswith("image 1 does not decode (") and written[0]["image"][0] == b"not a png"
    again = DecodeLedger(batches.index, 0.1)
    again.read(tmp_path / "quarantine")  # what a resumed run starts from
    assert again.export() == {"fake": {("parquet_data/fake/part-00000.parquet", 5): (
        "fake-0005", written[0]["reason"], {k: v for k, v in written[0].items() if k != "reason"})}}

    strict = _batches(tmp_path, micro=2, fraction=0.05)
    with pytest.raises(DataDecodeError) as err:
        for _ in range(11):
            strict.micro_batch(0)
    msg = str(err.value)
    assert msg.startswith("dataset fake, parquet_data/fake/part-00000.parquet, row 5 (key fake-0005): image 1 does "
                          "not decode (")
    assert ("2 of 24 rows unusable (8.3% > data.quality.max_quarantine_fraction=0.05: 1 quarantined by validation, "
            "1 failing to decode now)") in msg


# ---- through the trainer ----

PACKED = dataclasses.replace(FAKE, sample_tokens=lambda example, tokenizer, cfg: _tokens(example))
PACKED_SPEC = "test_train_packing:PACKED"


def _metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_packed_training_killed_mid_run_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    _write(tmp_path / "data", 24, bad={9})  # one row of 24 fails to decode: left out, recorded
    stage, train, model_cfg = tiny_configs(steps=8, lr=1e-2, grad_accum=2, save_every=3)
    train = train.model_copy(update={"max_tokens_per_micro_batch": 9, "num_workers": 2, "shuffle_window": 2})

    def run(out):
        return train_stage("s", stage, train, model_cfg, tmp_path / "data", out, progress=False,
                           model_family=PACKED_SPEC)

    full = run(tmp_path / "full")
    real_loss, calls = FakeScone.training_loss, {"n": 0}

    def crashing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * 6 + 2:  # second micro batch of step 7: after the state saved at step 6
            raise RuntimeError("simulated crash")
        return real_loss(self, *a, **kw)

    monkeypatch.setattr(FakeScone, "training_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed")
    monkeypatch.setattr(FakeScone, "training_loss", real_loss)
    resumed = run(tmp_path / "resumed")

    assert resumed["resumed_from_step"] == 6 and resumed["steps_this_run"] == 2
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    rows_full, rows_resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [r["loss"] for r in rows_resumed] == pytest.approx([r["loss"] for r in rows_full], abs=1e-6)
    seen = [r["samples_seen"] for r in rows_full]
    assert [r["samples_seen"] for r in rows_resumed] == seen
    assert resumed["samples_seen"] == full["samples_seen"] == seen[-1]
    assert len({b - a for a, b in zip([0] + seen, seen)}) > 1  # packed steps hold varying sample counts
    assert full["global_batch"] is None and full["max_tokens_per_micro_batch"] == 9
    for out in ("full", "resumed"):
        quarantined = pq.read_table(tmp_path / out / "quarantine" / "fake.parquet").to_pylist()
        assert [(q["key"], q["_row"]) for q in quarantined] == [("fake-0009", "1")]


def test_bagel_trains_on_packed_micro_batches_through_run_stage(tmp_path):
    from test_bagel_train import SPEC, _configs, _release_copy, _rows

    rows = [dict(r, qa=json.dumps([["is the cube mirrored", "yes"]])) for r in _rows(8)]
    write_rows(rows, tmp_path / "data", "s2i", rows_per_row_group=2)
    init = _release_copy(tmp_path)
    stage, train, model_cfg = _configs(steps=10, lr=2e-3, micro_batch=1)
    # a sample takes 261 to 263 tokens (one reference, a question): three fit in 800
    train = train.model_copy(update={"max_tokens_per_micro_batch": 800, "num_workers": 2, "shuffle_window": 2})
    summary = run_stage("s", stage, train, model_cfg, tmp_path / "data", tmp_path / "out", init, num_ranks=1,
                        progress=False, model_family=SPEC)
    rows = _metrics(tmp_path / "out")
    assert [r["samples_seen"] for r in rows] == [3 * (i + 1) for i in range(10)] and summary["samples_seen"] == 30
    assert np.mean([r["und_loss"] for r in rows[-3:]]) < 0.5 * np.mean([r["und_loss"] for r in rows[:3]])
    assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]])
    with pytest.raises(ValueError, match=r"dataset s2i, .*takes 26\d tokens, more than "
                                         r"train\.max_tokens_per_micro_batch=200"):
        run_stage("s", stage, train.model_copy(update={"max_tokens_per_micro_batch": 200}), model_cfg,
                  tmp_path / "data", tmp_path / "small", init, num_ranks=1, progress=False, model_family=SPEC)
