"""One map of the artifacts (data.layout): the steps (tasks.paths.Paths, built from params), the data stage's writers
and the dashboards resolve every path alike, so the report finds what the steps wrote wherever params put it."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from data.layout import ArtifactLayout
from tasks.params import load_params
from tasks.paths import Paths

ROOT = Path(__file__).resolve().parents[1]
NAME = "stage1_step1"


def _resolved(layout: ArtifactLayout) -> dict[str, Path | list]:
    """Every path the map gives: its properties, and its methods called with a name (a round index for srum_round)."""
    out = {}
    for attr, member in inspect.getmembers(ArtifactLayout):
        if attr.startswith("_") or attr == "at":
            continue
        if isinstance(member, property):
            out[attr] = getattr(layout, attr)
        elif callable(member):
            args = [p for p in inspect.signature(member).parameters if p != "self"]
            value = {0: (), 1: (1,) if attr == "srum_round" else (NAME,), 2: (NAME, "mico")}[len(args)]
            out[attr] = getattr(layout, attr)(*value)
    return out


@pytest.mark.parametrize("overrides", [[], ["pipeline.artifacts=elsewhere/art", "data.root=datasets/v2"]],
                         ids=["default", "moved"])
def test_tasks_and_dashboards_resolve_the_same_paths(overrides):
    params = load_params(ROOT / "params.yaml", overrides)
    tasks_view = _resolved(Paths.from_params(params))
    # the report's command line: --artifacts ROOT [--data DATA]; without --data, data.root's default place
    dashboards_view = _resolved(ArtifactLayout.at(params.pipeline.artifacts, None if not overrides else params.data.root))
    assert tasks_view == dashboards_view
    assert len(tasks_view) > 30 and tasks_view["sconeeval_summary"] == Path(params.pipeline.artifacts) / "scores" / NAME / NAME / "summary.json"


def test_the_data_stage_writes_where_the_map_says():
    from data.card import card_dir
    from data.quarantine import validation_quarantine_path
    from data.validate import gx_project_dir, validation_dir

    params = load_params(ROOT / "params.yaml", ["data.root=datasets/v2"])
    paths = Paths.from_params(params)
    assert validation_dir(params.data) == paths.validation and gx_project_dir(params.data) == paths.gx_project
    assert card_dir(params.data, "mico") == paths.datacard("mico")
    assert validation_quarantine_path(params.data.root, "mico").parent.parent == paths.validation


def test_the_report_reads_where_the_steps_wrote(tmp_path, monkeypatch):
    """Artifacts and data moved away from the defaults: the report step hands its map to the dashboards, which find
    the training log, the data card and the validation verdict where the writers put them."""
    from data.card import card_dir
    from data.validate import validation_dir
    from tasks.report import report_step

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(ROOT / "params.yaml", ["pipeline.artifacts=out", "data.root=datasets/v2",
                                                "registry.tracking_uri=sqlite:///out/mlflow.db"])
    paths = Paths.from_params(params)
    paths.checkpoint(NAME).mkdir(parents=True)
    paths.train_log(NAME).write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    card = card_dir(params.data, "moved_set")
    card.mkdir(parents=True)
    (card / "card.json").write_text(json.dumps({"name": "moved_set", "rows": 3}))
    validation_dir(params.data).mkdir(parents=True)
    (validation_dir(params.data) / "moved_set.json").write_text(json.dumps({"dataset": "moved_set", "success": True,
                                                                            "rows": 3}))
    page_path = report_step(params)
    assert page_path == paths.report_page == Path("out/reports/index.html")
    page = page_path.read_text()
    assert f'src="loss_{NAME}.png"' in page and (paths.reports / f"loss_{NAME}.png").is_file()
    for table in ("validation", "datacards"):
        assert "moved_set" in page[page.index(f'<table id="{table}">'):]
    assert not (tmp_path / "out" / "mlflow.db").exists()  # nothing registered: the report creates no store
