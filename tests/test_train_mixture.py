"""Dataset mixtures of a stage (train.stages.<stage>.mixture, model.data_loader.MixSchedule): each dataset gets its
share of the samples, deterministically, the same for any workers or rank layout, and resumable from the lanes'
positions alone; the chain's stages mix MICo and MIGE rows in where params say, and DVC knows they read them."""
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from data.formats.scone_s2i import write_rows
from flows.params import load_params
from model.config import StageConfig
from model.data_loader import MixSchedule, Sharding, StageBatches, StageIndex, mixture_shares
from model.train import train_stage
from test_train_fakes import FakeScone, examples_from_rows, tiny_configs

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"big": 40, "mid": 12, "small": 6}
MIX = {"mid": 0.3, "small": 0.2}  # big: the remaining 0.5


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(root: Path, name: str, n: int, bad=()) -> None:
    rng = np.random.default_rng(len(name))
    rows = []
    for i in range(n):
        ref = rng.integers(0, 256, (4, 4, 3))
        rows.append({"image": [b"not a png" if i in bad else _png(ref), _png(ref[:, ::-1])],
                     "instruction": f"mirror {i}", "key": f"{name}-{i:04d}"})
    write_rows(rows, root, name, 4, 8)  # row groups of 4 rows


@pytest.fixture
def root(tmp_path):
    for name, n in SIZES.items():
        _write(tmp_path, name, n)
    return tmp_path


def _keys(examples) -> list[str]:
    return [e["key"] for e in examples]


def _batches(root, *, world=1, rank=0, accum=2, micro=4, workers=0, mixture=MIX, seed=0):
    return StageBatches(StageIndex(root, list(SIZES)), examples_from_rows, _keys, seed=seed,
                        sharding=Sharding(micro, accum, world, rank), window=2, num_workers=workers,
                        mixture=mixture)


def _steps(batches: StageBatches, steps: int) -> list[list[list[str]]]:
    return [[batches.micro_batch(m) for m in range(batches.sharding.grad_accum)] for _ in range(steps)]


def test_shares_go_to_named_datasets_and_the_rest_by_rows(root):
    index = StageIndex(root, list(SIZES))
    assert mixture_shares(index, MIX) == pytest.approx([0.5, 0.3, 0.2])
    assert mixture_shares(index, {"small": 0.5}) == pytest.approx([0.5 * 40 / 52, 0.5 * 12 / 52, 0.5])


def test_each_dataset_gets_its_share_of_the_samples_over_many_batches(root):
    batches = _batches(root)
    served = _steps(batches, 128)  # 2 lanes x 128 micro batches x 4 samples: two chunks of 256 slots per lane
    for lane in range(2):
        keys = [k for step in served for k in step[lane]]
        counts = Counter(k.split("-")[0] for k in keys)
        for name, share in zip(SIZES, [0.5, 0.3, 0.2]):
            assert abs(counts[name] - share * len(keys)) <= 1, (lane, counts)  # whole chunks: exact to one slot
    # a dataset's own stream goes through its rows epoch by epoch (the lanes' shares of an epoch together hold each
    # row once): the small one repeats, every row of it served
    small = Counter(k for step in served for m in step for k in m if k.startswith("small"))
    assert len(small) == 6 and sum(small.values()) > 10 * 6


def test_mixed_batches_depend_on_the_seed_only_and_not_on_workers_or_ranks(root):
    one = _steps(_batches(root), 20)
    assert one == _steps(_batches(root, workers=2), 20)
    assert one != _steps(_batches(root, seed=1), 20)
    # 2 ranks x 1 micro step serve the lanes 1 rank x 2 micro steps serves
    for rank in range(2):
        ranks = _steps(_batches(root, world=2, rank=rank, accum=1), 20)
        assert [s[0] for s in ranks] == [s[rank] for s in one]


def test_a_resumed_mixed_stream_serves_the_batches_of_an_uninterrupted_one(root):
    whole = _steps(_batches(root), 90)  # crosses chunks of the schedule (256 slots per lane) and many epochs
    killed = _batches(root)
    head = _steps(killed, 70)
    state = killed.state()
    killed.close()
    assert state["lanes"] == {0: 280, 1: 280}
    resumed = _batches(root, workers=2)
    resumed.restore([state["lanes"][0], state["lanes"][1]])
    assert head + _steps(resumed, 20) == whole
    resumed.close()


def test_the_schedule_is_a_function_of_the_position():
    s = MixSchedule([0.5, 0.3, 0.2], seed=3, lane=1, chunk=10)
    slots = [s.dataset_at(p) for p in range(95)]
    for p in range(95):
        assert s.before(p).tolist() == [slots[:p].count(d) for d in range(3)]
        if p % 10 == 0:  # at a chunk boundary the shares hold to within one slot
            assert np.abs(s.before(p) - p * np.array([0.5, 0.3, 0.2])).max() < 1
    assert [MixSchedule([0.5, 0.3, 0.2], 3, 1, 10).dataset_at(p) for p in range(95)] == slots
    assert [MixSchedule([0.5, 0.3, 0.2], 3, 0, 10).dataset_at(p) for p in range(95)] != slots


def test_mixture_settings_are_checked():
    ok = StageConfig(datasets=["a", "b", "c"], steps=1, lr=1e-3, mixture={"b": 0.2})
    assert ok.mixture == {"b": 0.2}
    for mixture, match in [({"z": 0.1}, "not among the stage's datasets"), ({"a": 0.0}, r"in \(0, 1\]"),
                           ({"a": 0.5, "b": 0.5}, "leaving nothing"), ({"a": 0.5, "b": 0.3, "c": 0.1}, "sum to 1")]:
        with pytest.raises(ValueError, match=match):
            StageConfig(datasets=["a", "b", "c"], steps=1, lr=1e-3, mixture=mixture)


def test_mixed_training_killed_mid_run_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name, n in SIZES.items():
        _write(data, name, n, bad={3} if name == "big" else ())  # a row that fails to decode: a skipped slot
    stage, train, model_cfg = tiny_configs(steps=8, lr=1e-2, grad_accum=2, save_every=3)
    stage = stage.model_copy(update={"datasets": list(SIZES), "mixture": MIX})
    train = train.model_copy(update={"num_workers": 1, "shuffle_window": 2})

    def run(out):
        return train_stage("s", stage, train, model_cfg, data, out, progress=False,
                           model_family="test_train_fakes:FAKE", max_quarantine_fraction=0.1)

    full = run(tmp_path / "full")
    real_loss, calls = FakeScone.training_loss, {"n": 0}

    def crashing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * 6 + 2:  # after the state saved at step 6
            raise RuntimeError("simulated crash")
        return real_loss(self, *a, **kw)

    monkeypatch.setattr(FakeScone, "training_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed")
    monkeypatch.setattr(FakeScone, "training_loss", real_loss)
    resumed = run(tmp_path / "resumed")
    assert resumed["resumed_from_step"] == 6
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert resumed["samples_seen"] == full["samples_seen"] == 8 * 2 * 4


# ---- the chain ----

def test_the_chain_mixes_mico_and_mige_into_the_fine_tuning_stages():
    params = load_params(ROOT / "params.yaml")
    for name in ("stage1_step2", "stage2_step2"):
        stage = params.train.stages[name]
        assert {"mico", "mige_edit"} <= set(stage.datasets) and {"mico", "mige_edit"} <= set(stage.mixture)
    assert params.model.max_references >= params.data.mico_max_references  # MICo's five inputs whole


def test_every_train_stage_depends_on_the_datasets_it_reads():
    params = load_params(ROOT / "params.yaml")
    train = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    for name, item in train["foreach"].items():
        deps = {d.replace("${item.data}", item["data"]) for d in train["do"]["deps"]}
        for dataset in params.train.stages[name].datasets:
            assert f"artifacts/data/parquet_data/{dataset}" in deps, (name, dataset)


def test_json_state_of_a_mixed_run_is_plain_ints(root):
    batches = _batches(root)
    _steps(batches, 3)
    assert json.loads(json.dumps(batches.state())) == {"lanes": {"0": 12, "1": 12}, "samples": 24}
