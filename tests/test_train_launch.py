"""Launching a stage: run_config round trip, torchrun failure reports, and 2 real CPU ranks (gloo) vs 1 rank."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.launch import (StageLaunchError, _run_torchrun, read_run_config, run_stage, torchrun_command,
                          write_run_config)
from model.train import RunSettingsMismatch
from test_train_fakes import FAMILY, tiny_configs, write_dataset

TESTS = str(Path(__file__).resolve().parent)


def test_run_config_round_trips_every_config(tmp_path):
    stage, train, model_cfg = tiny_configs(steps=3, grad_accum=2, zero_stage=3)
    path = write_run_config("stage2_step1", stage, train, model_cfg, tmp_path / "data", tmp_path / "out",
                            tmp_path / "prev", 2, False, FAMILY)
    kw = read_run_config(path)
    assert kw["stage"] == stage and kw["train"] == train and kw["model_cfg"] == model_cfg
    assert kw["stage_name"] == "stage2_step1" and kw["progress"] is False and kw["model_family"] == FAMILY
    # relative to the launching directory (no absolute path in the artifacts), the same files
    assert not Path(kw["data_root"]).is_absolute() and not Path(kw["init_checkpoint"]).is_absolute()
    assert Path(kw["data_root"]).resolve() == (tmp_path / "data").resolve()
    assert Path(kw["init_checkpoint"]).resolve() == (tmp_path / "prev").resolve()


def test_torchrun_command_runs_the_worker_module_on_n_ranks(tmp_path):
    cmd = torchrun_command(tmp_path / "run_config.json", 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and cmd[-3:] == ["-m", "model.train_worker", str(tmp_path / "run_config.json")]


def test_failed_workers_raise_with_the_tail_of_their_log(tmp_path):
    script = "import sys\nfor i in range(100): print('line', i)\nprint('ValueError: bad shard', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(StageLaunchError) as err:
        _run_torchrun([sys.executable, "-c", script], tmp_path / "worker.log", echo=False)
    msg = str(err.value)
    assert "status 3" in msg and "ValueError: bad shard" in msg and "line 99" in msg
    assert "line 10\n" not in msg  # only the tail
    assert "line 0" in (tmp_path / "worker.log").read_text()  # the whole log is kept


@pytest.mark.slow
def test_two_torchrun_ranks_match_one_rank_with_accumulation(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    write_dataset(tmp_path / "data", "fake", 24)
    stage, train2, model_cfg = tiny_configs(steps=6, lr=1e-2, warmup=2, schedule="cosine", micro_batch=2,
                                            save_every=4)
    two = run_stage("s", stage, train2, model_cfg, tmp_path / "data", tmp_path / "two", num_ranks=2,
                    progress=False, model_family=FAMILY)
    # same global batch of 4: one rank, two micro batches of 2
    train1 = train2.model_copy(update={"grad_accum": 2})
    one = run_stage("s", stage, train1, model_cfg, tmp_path / "data", tmp_path / "one", num_ranks=1,
                    progress=False, model_family=FAMILY)

    assert two["num_ranks"] == 2 and two["global_batch"] == one["global_batch"] == 4
    a, b = two["rank_weight_checksums"]
    assert a == b  # ZeRO-2 keeps every rank's weights identical
    w2 = load_file(tmp_path / "two" / "model.safetensors")
    w1 = load_file(tmp_path / "one" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=1e-5)
    assert json.loads((tmp_path / "two" / "run_config.json").read_text())["num_ranks"] == 2
    assert (tmp_path / "two" / "ds_state" / "step0000004").is_dir()
    # every rank saved its optimizer shard
    assert len(list((tmp_path / "two" / "ds_state" / "step0000004").glob("*optim_states.pt"))) == 2

    # re-running the finished stage returns its summary without starting torchrun again
    log = (tmp_path / "two" / "worker.log").read_text()
    again = run_stage("s", stage, train2, model_cfg, tmp_path / "data", tmp_path / "two", num_ranks=2,
                      progress=False, model_family=FAMILY)
    assert again == two and (tmp_path / "two" / "worker.log").read_text() == log
    with pytest.raises(RunSettingsMismatch, match="world_size: 2 -> 3"):
        run_stage("s", stage, train2, model_cfg, tmp_path / "data", tmp_path / "two", num_ranks=3,
                  progress=False, model_family=FAMILY)
