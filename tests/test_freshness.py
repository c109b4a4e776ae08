"""tasks.freshness.Ledger: DVC decides what is stale; a stage is recorded only after it ran; DVC's own words."""
import subprocess

import pytest
import yaml

from tasks.freshness import DvcError, Ledger


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the chain runs its DVC calls from the project root
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    (tmp_path / "code.py").write_text("VALUE = 1\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"step": {"size": 3}}))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": "python code.py", "deps": ["code.py"], "params": ["step.size"], "outs": ["out.txt"]}}}))
    return tmp_path


def _make(project):
    (project / "out.txt").write_text("made\n")
    return "ran"


def test_a_stage_runs_when_stale_is_recorded_then_is_up_to_date(project):
    ledger = Ledger.for_run(project, project / "params.yaml", None)
    assert ledger.enabled and ledger.changes("make")  # never ran
    assert ledger.run_if_stale("make", _make, project) == "ran"
    assert ledger.changes("make") == []
    assert ledger.run_if_stale("make", pytest.fail, "a fresh stage ran again") is None
    (project / "code.py").write_text("VALUE = 2\n")  # a code change makes it stale again
    assert ledger.changes("make")


def test_overrides_or_another_params_file_turn_the_record_off(project):
    with_set = Ledger.for_run(project, project / "params.yaml", ["step.size=4"])
    assert not with_set.enabled and "overrides" in with_set.reason
    other = Ledger.for_run(project, project / "other.yaml", None)
    assert not other.enabled
    assert with_set.run_if_stale("make", _make, project) == "ran"  # runs, records nothing
    assert not (project / "dvc.lock").exists()


def test_a_dvc_failure_carries_dvcs_own_message(project):
    (project / "params.yaml").write_text(yaml.safe_dump({"other": 1}))  # step.size is gone
    ledger = Ledger.for_run(project, project / "params.yaml", None)
    with pytest.raises(DvcError, match="step.size"):
        _make(project)
        ledger.record("make")
