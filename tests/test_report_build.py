"""The HTML report from a small MLflow store and fake evaluation outputs."""
import json
import shutil
import re

import numpy as np
import pytest
from PIL import Image

from dashboards.report import PAPER_ROWS, build_report, sample_paths
from registry import SCONEEVAL_COM, SCONEEVAL_DIS, SCONEEVAL_OVERALL, TABLE3_COLUMNS
from registry.config import GateConfig, RegistryConfig
from registry.gate import apply_gate
from registry.models import register_checkpoint
from registry.tracking import Tracker

MODEL = "report-model"


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def table3_metrics(base: float) -> dict:
    """Every Table 3 column, distinct per column so cells can be found in the HTML."""
    m = {key: base + 0.01 * i for i, (_, key) in enumerate(TABLE3_COLUMNS[:-3])}
    m[SCONEEVAL_COM], m[SCONEEVAL_DIS] = base, base + 1.0
    m[SCONEEVAL_OVERALL] = base + 0.5
    return m


@pytest.fixture(scope="module")
def repo(tmp_path_factory, bagel_release):
    """A repo root with artifacts/: two registered checkpoints (one SRUM), one stage trained but not registered."""
    root = tmp_path_factory.mktemp("repo")
    artifacts = root / "artifacts"
    tracker = Tracker(RegistryConfig(tracking_uri="sqlite:///artifacts/mlflow.db", model_name=MODEL), root)
    heldout = {"mico.overall": 31.5, "mico.object.score": 40.25, "mico.hoi.score": 12.75, "mico.w": 0.5,
               "mige.overall": 6.125, "mige.addition.subject_fidelity": 7.5, "mige.replacement.preservation": 9.25}
    plan = [("stage1_step1", {**table3_metrics(3.0), **heldout}), ("srum_round1", {**table3_metrics(2.0), "srum.reward_mean": 0.625,
                                                                    "t2i.color": 0.75})]
    for i, (name, metrics) in enumerate(plan):
        ckpt = artifacts / "checkpoints" / name
        shutil.copytree(bagel_release, ckpt)  # a checkpoint is a release directory
        (ckpt / "metrics.jsonl").write_text("\n".join(
            json.dumps({"step": s, "loss": 2.0 / s, "fm_loss": 1.5 / s, "und_loss": 0.5 / s}) for s in range(1, 21)))
        # both where the evaluate step writes them (evaluation.runner's layout, data.layout's sconeeval_summary),
        # the one place the report reads; v1 lists its samples under `samples`, v2 under `sample_images`
        score_dir = artifacts / "scores" / name / name
        (score_dir / "samples").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * j + 10 * i, np.uint8)).save(score_dir / "samples" / f"{j}.png")
        summary = score_dir / "summary.json"
        key = "sample_images" if i else "samples"
        summary.write_text(json.dumps({key: [f"samples/{j}.png" for j in range(3)] + ["samples/gone.png"]}))
        with tracker.run(name) as run_id:
            tracker.log_metrics_file(run_id, ckpt / "metrics.jsonl")
            rv = register_checkpoint(tracker, run_id, ckpt, MODEL, metrics, eval_summary=None if i else summary)
        apply_gate(tracker.client, MODEL, rv.version, GateConfig())
    late = artifacts / "checkpoints" / "stage1_step2"
    late.mkdir(parents=True)
    (late / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    out = build_report(artifacts, "sqlite:///artifacts/mlflow.db", MODEL)
    return artifacts, out


def test_report_table_rows_and_paper_context(repo):
    artifacts, out = repo
    assert out == artifacts / "reports" / "index.html"
    page = out.read_text()
    table = re.search(r'<table id="sconeeval">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr.*?</tr>", table, re.S)
    assert len(rows) == 1 + 2 + len(PAPER_ROWS)  # header, our two versions in registry order, paper rows
    assert "stage1_step1 v1" in rows[1] and "srum_round1 v2" in rows[2]
    assert 'class="badge champion"' in rows[1] and 'class="badge candidate"' in rows[2]
    cells = re.findall(r"<td(?! class=\"name)[^>]*>([^<]*)</td>", rows[1])
    assert cells == ["3.00", "3.01", "3.02", "3.03", "3.04", "3.05", "3.06", "3.07", "3.08", "3.09",
                         "3.00", "4.00", "3.50"]
    assert "Scone (paper)" in rows[-1] and "8.50" in rows[-1] and "8.98" in rows[-1]
    assert "BAGEL" in rows[-2] and "6.97" in rows[-2]
    for label, _ in TABLE3_COLUMNS:
        assert label.replace("&", "&amp;") in table


def test_report_gate_srum_t2i_sections(repo):
    _, out = repo
    page = out.read_text()
    gate = re.search(r'<table id="gate">(.*?)</table>', page, re.S).group(1)
    assert re.search(r"stage1_step1 v1</td><td class=\"promoted\">promoted", gate)
    assert re.search(r"srum_round1 v2</td><td class=\"rejected\">rejected</td><td>1</td>", gate)
    assert "fail: regression" in gate
    assert "champion <b>stage1_step1 v1</b>" in page
    srum = re.search(r'<table id="srum">(.*?)</table>', page, re.S).group(1)
    assert "reward_mean" in srum and "0.625" in srum and "stage1_step1" not in srum
    assert "0.75" in re.search(r'<table id="t2i">(.*?)</table>', page, re.S).group(1)


def test_report_images_exist(repo):
    artifacts, out = repo
    page = out.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    for src in srcs:
        assert (out.parent / src).is_file(), src
    curves = [s for s in srcs if s.startswith("loss_")]
    # both registered runs (from MLflow) and the unregistered stage (from its metrics.jsonl)
    assert sorted(curves) == ["loss_srum_round1_v2.png", "loss_stage1_step1_v1.png", "loss_stage1_step2.png"]
    thumbs = [s for s in srcs if s.startswith("samples/")]
    assert len(thumbs) == 6  # three per checkpoint; the missing file is skipped
    with Image.open(out.parent / thumbs[0]) as im:
        assert im.size == (96, 96)
    assert "sconeeval_overall.png" in srcs


def test_report_without_store_shows_not_run(tmp_path):
    out = build_report(tmp_path / "artifacts", "sqlite:///artifacts/mlflow.db", MODEL)
    page = out.read_text()
    assert "not run" in page and "not found" in page
    assert not (tmp_path / "artifacts" / "mlflow.db").exists()  # the report never creates a store
    assert "Scone (paper)" in page


def test_sample_paths_accepts_objects_and_mappings(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    s = tmp_path / "summary.json"
    s.write_text(json.dumps({"samples": [{"path": "a.png"}, {"image": str(tmp_path / "a.png")}, {"other": 1}]}))
    assert sample_paths(s) == [tmp_path / "a.png", tmp_path / "a.png"]
    s.write_text(json.dumps({"samples": {"k1": "a.png"}}))
    assert sample_paths(s) == [tmp_path / "a.png"]


def _ablation_scores(mean: float, found: float, std: float = 0.01) -> dict:
    ms = lambda v: {"mean": v, "std": std, "runs": [v - std, v + std]}  # noqa: E731
    return {s: {"mean": ms(mean), "found": ms(found), "per_category": {"colour": ms(mean)}}
            for s in ("train_prompts", "heldout_prompts")}


def test_report_plots_the_srum_ablation_and_judge_agreement(tmp_path):
    artifacts = tmp_path / "artifacts"
    (artifacts / "bench").mkdir(parents=True)
    result = {
        "judge": "oracle", "seeds": [0, 1], "eval_samples_per_prompt": 2,
        "init": {"label": "init", "scores": {s: {"mean": 0.01, "found": 0.1, "per_category": {"colour": 0.01}}
                                             for s in ("train_prompts", "heldout_prompts")}},
        "variants": {"sft": {"label": "SFT", "scores": _ablation_scores(0.02, 0.12)},
                     "srum": {"label": "SRUM", "scores": _ablation_scores(0.04, 0.2)}},
        "self_vs_oracle_judge": {"0": {"global": {"n": 3, "pearson": -0.25, "sign_agreement": 0.5},
                                       "regions": {"n": 1, "pearson": None, "sign_agreement": 1.0}}},
    }
    (artifacts / "bench" / "srum-ablation.json").write_text(json.dumps(result))
    out = build_report(artifacts, "sqlite:///artifacts/mlflow.db", MODEL)
    page = out.read_text()
    section = page[page.index("SRUM ablation"):]
    for prompt_set in ("train_prompts", "heldout_prompts"):
        assert f'src="srum_ablation_{prompt_set}.png"' in section
        assert (out.parent / f"srum_ablation_{prompt_set}.png").stat().st_size > 1000
    assert "<td>-0.25</td><td>0.50</td><td>n/a</td><td>1.00</td>" in section

    (artifacts / "bench" / "srum-ablation.json").write_text('{"judge": "oracle"}')
    page = build_report(artifacts, "sqlite:///artifacts/mlflow.db", MODEL).read_text()
    assert "srum-ablation.json is unreadable" in page and "re-run <code>scone bench srum-ablation</code>" in page


def test_mico_and_mige_leaderboards_beside_the_papers_rows(repo):
    from evaluation.paper_results import MICO_TABLE2, MIGE_TABLE3

    artifacts, out = repo
    page = out.read_text()
    mico = re.search(r'<table id="mico">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr.*?</tr>", mico, re.S)
    assert len(rows) == 1 + 2 + len(MICO_TABLE2)
    cells = re.findall(r"<td(?! class=\"name)[^>]*>([^<]*)</td>", rows[1])
    assert cells == ["31.50", "40.25", "not run", "12.75", "not run", "0.50", "not run", "not run"]
    assert "not run" in rows[2]  # the SRUM version has no MICo score
    assert "BAGEL (paper)" in mico and "19.3" in mico and "De&amp;Re" in rows[0]
    mige = re.search(r'<table id="mige">(.*?)</table>', page, re.S).group(1)
    assert "6.12" in mige and "7.50" in mige and "9.25" in mige
    paper = re.search(r'<table id="mige-paper">(.*?)</table>', page, re.S).group(1)
    assert len(re.findall(r"<tr", paper)) == 1 + len(MIGE_TABLE3) and "0.863" in paper and "MIGE (paper)" in paper
