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


def test_a_dvc_lock_cut_short_by_a_killed_commit_is_restored_and_only_that_stage_reruns(project, caplog):
    yaml_text = yaml.safe_dump({"stages": {
        "make": {"cmd": "python code.py", "deps": ["code.py"], "outs": ["out.txt"]},
        "second": {"cmd": "python code.py", "deps": ["code.py"], "outs": ["second.txt"]}}})
    (project / "dvc.yaml").write_text(yaml_text)
    ledger = Ledger.for_run(project, project / "params.yaml", None)
    assert ledger.run_if_stale("make", _make, project) == "ran"
    (project / "second.txt").write_text("second\n")
    ledger.record("second")  # the commit that was "killed": its copy of the record before it is kept
    lock = project / "dvc.lock"
    whole = lock.read_text()
    lock.write_text(whole[: len(whole) // 3])  # what a kill -9 mid-write leaves
    again = Ledger.for_run(project, project / "params.yaml", None)
    assert again.changes("make") == []  # the record before the interrupted commit is back
    assert again.changes("second")  # the interrupted stage is stale again, so it reruns
    assert (project / "dvc.lock.broken").read_text() == whole[: len(whole) // 3]
    assert "restored the record" in caplog.text


def test_an_unreadable_dvc_lock_without_a_copy_names_the_file_and_the_fix(project):
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  make: [unclosed\n")
    with pytest.raises(DvcError, match="dvc.lock is unreadable.*move dvc.lock aside"):
        Ledger.for_run(project, project / "params.yaml", None).changes("make")


def test_a_thread_asking_while_another_records_a_slow_stage_waits_its_turn(project, monkeypatch):
    """The pipeline scores in a second thread while the main one records training stages. DVC's repository lock
    gives up after about 3 s, and hashing a checkpoint can take longer: every DVC call of the process takes its
    turn instead (tasks.freshness.ONE_DVC_CALL)."""
    import threading
    import time

    from dvc.stage import Stage

    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        n: {"cmd": "python code.py", "deps": ["code.py"], "outs": [f"{n}.txt"]} for n in ("slow", "quick")}}))
    for n in ("slow", "quick"):
        (project / f"{n}.txt").write_text(n)
    save = Stage.save
    hashing = threading.Event()

    def slow_save(stage, *args, **kwargs):  # a big checkpoint being hashed, with DVC's lock held
        if stage.name == "slow":
            hashing.set()
            time.sleep(4.5)
        return save(stage, *args, **kwargs)

    monkeypatch.setattr(Stage, "save", slow_save)
    ledger = Ledger.for_run(project, project / "params.yaml", None)
    errors = []

    def record_slow():
        try:
            ledger.record("slow")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    recorder = threading.Thread(target=record_slow)
    recorder.start()
    assert hashing.wait(30)
    assert ledger.changes("quick")  # waits for the slow commit instead of failing on DVC's lock
    ledger.record("quick")
    recorder.join()
    assert errors == []
    assert ledger.changes("slow") == [] and ledger.changes("quick") == []
