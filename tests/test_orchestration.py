"""The Prefect pipeline, dvc.yaml and prefect.yaml describe the same chain."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.cli import build_parser
from flows.params import load_params
from tasks.freshness import evaluate_stage
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


def _dvc_stage_names(tmp_path, params_text: str) -> list[str]:
    """The stages DVC itself generates from dvc.yaml and a given params.yaml (a scratch DVC project)."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(params_text)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=tmp_path, check=True, capture_output=True,
                         text=True).stdout
    return out.split()


def test_dvc_stage_lists_follow_params(tmp_path):
    """Adding a SRUM round in params.yaml adds its training and scoring stages: dvc.yaml lists none by hand."""
    text = (ROOT / "params.yaml").read_text()
    params = load_params(ROOT / "params.yaml")
    names = _dvc_stage_names(tmp_path, text)
    assert [n for n in names if n.startswith(("evaluate@", "evaluate_srum@"))] == \
        [evaluate_stage(c) for c in checkpoint_names(params)]
    assert [n for n in names if n.startswith("srum@")] == [f"srum@{r}" for r in params.srum.rounds]

    raw = yaml.safe_load(text)
    raw["srum"]["rounds"]["srum_round2"] = "srum_round1"  # what dvc exp run -S '+srum.rounds.srum_round2=...' does
    (tmp_path / "two").mkdir()
    two = _dvc_stage_names(tmp_path / "two", yaml.safe_dump(raw))
    assert {"srum@srum_round2", "evaluate_srum@srum_round2"} <= set(two)
    assert len(two) == len(names) + 2
    assert checkpoint_names(load_params(tmp_path / "two" / "params.yaml"))[-2:] == ["srum_round1", "srum_round2"]


def test_srum_rounds_param_is_a_chain():
    from model.config import SrumConfig

    assert SrumConfig(rounds=2).rounds == {"srum_round1": "stage2_step2", "srum_round2": "srum_round1"}
    assert SrumConfig(rounds=0).count == 0
    assert SrumConfig(rounds={"srum_round1": "stage1_step2"}).init_from == "stage1_step2"
    with pytest.raises(ValueError, match="round 2 continues srum_round1"):
        SrumConfig(rounds={"srum_round1": "stage2_step2", "srum_round2": "stage2_step2"})
    with pytest.raises(ValueError, match="rounds are srum_round1, srum_round2"):
        SrumConfig(rounds={"srum_round2": "stage2_step2"})


def test_dvc_builds_every_dataset():
    cmds = " ".join(s["cmd"] for s in _dvc()["stages"].values() if isinstance(s, dict) and "cmd" in s)
    for name in DATASETS:
        assert f"scone data build {name}" in cmds


def test_prefect_yaml_has_a_scheduled_pipeline_deployment():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    dep = {d["name"]: d for d in spec["deployments"]}["nightly"]
    assert dep["entrypoint"] == "flows/pipeline.py:scone_pipeline"
    assert dep["schedules"][0]["cron"]


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


def test_serve_runs_the_on_demand_stage_beside_the_chain():
    """`scone serve` serves every deployment: the scheduled ones one at a time, the on-demand GPU stage in a runner
    of its own, so a chain waiting for its stage never holds the slot the stage needs."""
    import asyncio

    from flows.deploy import _serve_groups, deployment_specs, runner_groups

    groups = runner_groups(deployment_specs(str(ROOT / "prefect.yaml")))
    assert {k: [d["name"] for d in v] for k, v in groups.items()} == \
        {"chain": ["nightly", "srum-weekly"], "on-demand": ["gpu"]}

    started = []

    class FakeRunner:
        def __init__(self, name, limit, pause_on_shutdown):
            self.name, self.limit, self.deployments = name, limit, []

        async def aadd_deployment(self, deployment):
            self.deployments.append(deployment)

        async def start(self):
            started.append((self.name, self.limit, list(self.deployments)))

    asyncio.run(_serve_groups({"chain": ["nightly", "srum-weekly"], "on-demand": ["gpu"]}, runner_cls=FakeRunner))
    assert sorted(started) == [("scone-serve-chain", 1, ["nightly", "srum-weekly"]),
                               ("scone-serve-on-demand", 1, ["gpu"])]


def test_round_names_agree_between_params_and_paths():
    from model.config import srum_round_name
    from tasks.paths import srum_name

    assert [srum_name(k) for k in (1, 2, 12)] == [srum_round_name(k) for k in (1, 2, 12)]


class _Future:
    def __init__(self, log, name, error=None):
        self.log, self.name, self.error = log, name, error

    def result(self):
        self.log.append(f"waited {self.name}")
        if self.error:
            raise self.error

    def wait(self):
        self.log.append(f"settled {self.name}")


def test_scoring_beside_training_keeps_one_in_flight_and_surfaces_its_failure(monkeypatch):
    import flows.pipeline as pl

    log = []
    failing = RuntimeError("judge down")

    def submit(ledger, params, name):
        log.append(f"started {name}")
        return _Future(log, name, failing if name == "b" else None)

    monkeypatch.setattr(pl.score_checkpoint, "submit", submit)
    scoring = pl.ScoringBesideTraining(ledger=None, params=None, enabled=True)
    scoring.start("a")
    scoring.start("b")  # a is waited for first: one scoring at a time, on the one spare core
    assert log == ["started a", "waited a", "started b"]
    with pytest.raises(RuntimeError, match="judge down"):
        scoring.start("c")  # b's failure surfaces at the next wait, before anything else starts
    assert "started c" not in log and scoring.started == {"a", "b"}

    log.clear()
    scoring = pl.ScoringBesideTraining(ledger=None, params=None, enabled=True)
    scoring.start("a")
    scoring.settle()  # after a training failure: the scoring finishes writing, and raises nothing over it
    assert log == ["started a", "settled a"] and scoring.pending is None

    off = pl.ScoringBesideTraining(ledger=None, params=None, enabled=False)
    off.start("a")
    assert off.started == set() and off.pending is None  # the pipeline then scores every checkpoint in turn
