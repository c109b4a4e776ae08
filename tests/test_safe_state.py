"""Resuming a stage never executes code stored in its training state (issue: a crafted ds_state pickle)."""
import os
import pickle

import pytest

from model.safe_state import UnsafeCheckpointError, file_digest, safe_load
from model.train import train_stage
from test_train_fakes import FAMILY, FakeScone, tiny_configs, write_dataset


class _Payload:
    """Unpickling this runs `touch <marker>`: what an attacker would put into a state file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _interrupted_run(tmp_path, monkeypatch):
    write_dataset(tmp_path / "data", "fake", 24)
    stage, train, model_cfg = tiny_configs(steps=4)
    train = train.model_copy(update={"save_every": 2})
    real = FakeScone.training_loss
    calls = {"n": 0}

    def crash_at_step_3(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(self, *a, **kw)

    monkeypatch.setattr(FakeScone, "training_loss", crash_at_step_3)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_stage("s", stage, train, model_cfg, tmp_path / "data", out, progress=False, model_family=FAMILY)
    monkeypatch.setattr(FakeScone, "training_loss", real)
    return stage, train, model_cfg, out


def test_deepspeed_state_loads_weights_only_and_resumes(tmp_path, monkeypatch):
    stage, train, model_cfg, out = _interrupted_run(tmp_path, monkeypatch)
    states = sorted((out / "ds_state" / "step0000002").glob("*.pt"))
    assert states and all(isinstance(safe_load(p), dict) for p in states)  # the allow-list covers ZeRO-2 state
    summary = train_stage("s", stage, train, model_cfg, tmp_path / "data", out, progress=False, model_family=FAMILY)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_crafted_pickle_in_the_state_is_refused_and_never_run(tmp_path, monkeypatch, victim):
    stage, train, model_cfg, out = _interrupted_run(tmp_path, monkeypatch)
    marker = tmp_path / "pwned"
    path = out / "ds_state" / "step0000002" / victim
    path.write_bytes(pickle.dumps({"module": _Payload(marker)}))
    with pytest.raises(UnsafeCheckpointError, match=victim) as err:
        train_stage("s", stage, train, model_cfg, tmp_path / "data", out, progress=False, model_family=FAMILY)
    assert "delete the stage's working folder" in str(err.value)
    assert not marker.exists()  # nothing was executed


def test_file_digest_sees_a_same_size_change(tmp_path):
    f = tmp_path / "shard.parquet"
    f.write_bytes(b"abcdef")
    before = file_digest([f])
    f.write_bytes(b"abcdeg")
    assert file_digest([f]) != before
