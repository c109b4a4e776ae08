"""The Prefect pipeline, dvc.yaml and prefect.yaml describe the same chain."""
from pathlib import Path

import yaml

from flows.cli import build_parser
from flows.deploy import nightly_schedule
from flows.params import load_params
from tasks.paths import DATASETS, checkpoint_names

ROOT = Path(__file__).resolve().parents[1]


def _dvc():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_dvc_trains_the_stages_of_params_in_order():
    params = load_params(ROOT / "params.yaml")
    items = _dvc()["stages"]["train"]["foreach"]
    assert list(items) == params.pipeline.stage_order
    # each stage after the first depends on the previous stage's checkpoint
    for prev, cur in zip(list(items), list(items)[1:]):
        assert items[cur]["init"] == f"artifacts/checkpoints/{prev}"
        assert params.train.stages[cur].init_from == prev


def test_dvc_srum_rounds_and_evaluations_match_params():
    params = load_params(ROOT / "params.yaml")
    dvc = _dvc()
    rounds = dvc["vars"][0]["srum_rounds"]
    assert [r["index"] for r in rounds] == list(range(1, params.srum.rounds + 1))
    assert rounds[0]["init"] == params.srum.init_from
    assert dvc["stages"]["evaluate"]["foreach"] == checkpoint_names(params)


def test_dvc_builds_every_dataset():
    cmds = " ".join(s["cmd"] for s in _dvc()["stages"].values() if isinstance(s, dict) and "cmd" in s)
    for name in DATASETS:
        assert f"scone data build {name}" in cmds


def test_prefect_yaml_has_a_scheduled_pipeline_deployment():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    dep = {d["name"]: d for d in spec["deployments"]}["nightly"]
    assert dep["entrypoint"] == "flows/pipeline.py:scone_pipeline"
    assert nightly_schedule(str(ROOT / "prefect.yaml")) == dep["schedules"][0]["cron"]


def test_cli_parses_every_documented_command():
    ap = build_parser()
    for argv in (
        ["pipeline"],
        ["data", "build", "all"],
        ["train", "--stage", "stage1_step1", "--set", "train.micro_batch=2"],
        ["eval", "checkpoint", "stage2_step2"],
        ["eval", "aggregate", "--results-dir", "d", "--model", "m", "--benchmark", "sconeeval", "--out", "o.json"],
        ["srum", "--rounds", "2"],
        ["srum", "round", "1"],
        ["srum", "reward-map", "--rewards", "r.jsonl", "--width", "8", "--height", "8", "--out", "m.npy"],
        ["register"],
        ["report"],
    ):
        assert ap.parse_args(argv).command == argv[0]
