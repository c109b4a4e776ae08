"""Per-checkpoint diagnostics (evaluation.diagnostics): bridge localisation against the rendered subject masks,
self vs oracle judge agreement, the contact sheet; their step (tasks.diagnostics), the evaluate step's call and the
report's section."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data.records import Case
from data.render import token_cover
from data.scene import Placement, Scene, Subject
from evaluation.diagnostics import (DIAG_PREFIX, FILES, SheetRow, agreement, bridge_case, contact_sheet, headline,
                                    mlflow_metrics, pearson, roc_auc, sign_agreement, token_labels)


def _subject(colour: str, category: str = "square") -> Subject:
    return Subject(uid=f"t-{colour}", domain="object", category=category, colour=colour)


def distinction_case() -> Case:
    """One 32 px reference: the referred red square fills the top-left 2 x 2 tokens (8 px ViT patches), a blue
    distractor square the bottom-right 2 x 2; the target holds the red square alone."""
    red, blue = _subject("red"), _subject("blue")
    ref = Scene("beach", (Placement(red, (0, 0, 16, 16)), Placement(blue, (16, 16, 32, 32))))
    target = Scene("city", (Placement(red, (8, 8, 24, 24)),))
    return Case(key="distinction_cross_9000", task_type="distinction_cross", case_type="1O",
                instruction="draw the red square of image 1 in the city", references=[ref], target=target,
                subject_list=[["the red square", "the blue square"]], subject_label=[[1, 0]])


# ---------------------------------------------------------------- ground truth and statistics


def test_token_cover_is_the_area_share_on_any_grid():
    mask = np.zeros((32, 32), bool)
    mask[:16, :8] = True
    cover = token_cover(mask, (4, 4))
    assert cover[0, 0] == cover[1, 0] == 1.0 and cover.sum() == 2.0
    assert token_cover(mask, (3, 3)).sum() == pytest.approx(mask.mean() * 9, abs=1e-5)  # non-divisible grid


def test_token_labels_split_referred_distractor_and_background():
    labels = token_labels(distinction_case().references[0], 0, (4, 4))
    assert labels.referred[:2, :2].all() and labels.referred.sum() == 4
    assert labels.other.sum() == 12 and not (labels.other & labels.referred).any()
    assert labels.distractor[2:, 2:].all() and labels.distractor.sum() == 4


def test_auc_is_one_for_the_mask_half_for_a_constant_zero_for_the_inverse():
    case = distinction_case()
    labels = token_labels(case.references[0], 0, (4, 4))
    s = labels.referred.astype(np.float32)
    assert roc_auc(s, labels.referred, labels.other) == 1.0
    assert roc_auc(np.full((4, 4), 0.02), labels.referred, labels.other) == 0.5
    assert roc_auc(1 - s, labels.referred, labels.other) == 0.0
    assert roc_auc(s, labels.referred, np.zeros((4, 4), bool)) is None  # no negatives: undefined
    # the case figures, through what the step computes per case (s given as the pipeline returns it)
    perfect = bridge_case(case, [s], tau=0.5)
    assert perfect["auc"] == perfect["auc_distractors"] == 1.0
    assert perfect["kept_referred"] == 1.0 and perfect["kept_other"] == 0.0
    flat = bridge_case(case, [np.full((4, 4), 0.3, np.float32)], tau=0.5)
    assert flat["auc"] == flat["auc_distractors"] == 0.5 and flat["kept_referred"] == 0.0
    # s high on the distractor only: every distractor token above the referred ones (AUC 0 against them), the
    # referred tied with the 8 background tokens (half each): 4 x 8 x 0.5 / (4 x 12) against all other tokens
    fooled = bridge_case(case, [labels.distractor.astype(np.float32)])
    assert fooled["auc_distractors"] == 0.0 and fooled["auc"] == pytest.approx((4 * 8 * 0.5) / 48)


def test_a_scene_only_reference_has_no_referred_subject():
    case = distinction_case()
    case.references.append(Scene("snow"))
    case.subject_list.append([])
    case.subject_label.append([])
    entry = bridge_case(case, [np.eye(4, dtype=np.float32), np.ones((4, 4), np.float32)])
    assert [r["reference"] for r in entry["references"]] == [0]


def test_pearson_and_sign_agreement_on_hand_made_scores():
    assert pearson([0.1, 0.5, 0.9], [-1.0, 0.0, 1.0]) == pytest.approx(1.0)
    assert pearson([0.1, 0.5, 0.9], [1.0, 0.0, -1.0]) == pytest.approx(-1.0)
    assert pearson([0.3, 0.3, 0.3], [1.0, 0.0, -1.0]) is None  # a constant judge: undefined
    assert pearson([0.3], [1.0]) is None
    assert sign_agreement([0.5, -0.2, 0.0, 0.7], [0.9, 0.4, 0.0, -0.1]) == 0.5
    a = agreement([(0.5, 0.9), (-0.5, -0.4), (0.2, 0.1), (-0.1, 0.3)])
    assert a["n"] == 4 and a["sign_agreement"] == 0.75
    assert a["pearson"] == pytest.approx(float(np.corrcoef([0.5, -0.5, 0.2, -0.1], [0.9, -0.4, 0.1, 0.3])[0, 1]))


def test_headline_leaves_undefined_figures_out_and_mlflow_names_them_under_the_prefix():
    result = {"bridge": {"auc": 0.75, "auc_distractors": None, "kept_referred": 0.5, "kept_other": 0.25, "cases": 3},
              "self_vs_oracle": {"global": {"n": 3, "pearson": 0.5, "sign_agreement": 1.0},
                                 "regions": {"n": 0, "pearson": None, "sign_agreement": None}},
              "seconds": {"total": 1.5}}
    flat = headline(result)
    assert flat["bridge_auc"] == 0.75 and "bridge_auc_distractors" not in flat and "self_oracle_region_r" not in flat
    assert flat["self_oracle_global_r"] == 0.5 and flat["self_oracle_region_n"] == 0
    metrics = mlflow_metrics(result)
    assert metrics[f"{DIAG_PREFIX}bridge_auc"] == 0.75 and metrics[f"{DIAG_PREFIX}seconds"] == 1.5


# ---------------------------------------------------------------- pictures


def test_the_contact_sheet_has_one_row_per_case(tmp_path):
    from evaluation.diagnostics import THUMB

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    rows = [SheetRow(f"case {k}", [np.zeros((32, 32, 3), np.uint8)] * (k + 1), "draw it", np.full((32, 32, 3), 255, np.uint8),
                     np.full((32, 32, 3), c, np.uint8) if k != 1 else None) for k, c in enumerate(colours)]
    path = contact_sheet(rows, tmp_path / "sheet.png")
    sheet = np.asarray(Image.open(path).convert("RGB"))
    row_h, head, gap = THUMB + 12, 20, 6
    assert sheet.shape[0] == head + 3 * row_h
    x_generated = sheet.shape[1] - gap - THUMB // 2  # the middle of the generated column
    for k, c in enumerate(colours):
        pixel = tuple(sheet[head + k * row_h + gap + 10, x_generated])
        assert pixel == ((200, 200, 200) if k == 1 else c)  # a missing image is a grey box


def test_the_report_section_reads_the_runs_metrics_and_copies_the_pictures(tmp_path):
    from dashboards import diagnostics as section
    from dashboards.report import Checkpoint
    from data.layout import ArtifactLayout

    assert section.PREFIX == DIAG_PREFIX and section.DETAILS == FILES["details"]
    assert {k for _, k in section.COLUMNS} <= set(headline(
        {"bridge": {"auc": .5, "auc_distractors": .5, "kept_referred": .5, "kept_other": .5, "cases": 1},
         "self_vs_oracle": {s: {"n": 2, "pearson": .1, "sign_agreement": .5} for s in ("global", "regions")}}))
    folder = tmp_path / "artifacts" / "scores" / "stage2_step1" / "diagnostics"
    (folder / "overlays").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "contact_sheet.png")
    Image.new("RGB", (8, 8)).save(folder / "overlays" / "k.png")
    (folder / "diagnostics.json").write_text(json.dumps({"pictures": {"contact_sheet": "contact_sheet.png",
                                                                      "overlay": "overlays/k.png"}}))
    ckpts = [Checkpoint("stage2_step1", "3", metrics={f"{DIAG_PREFIX}bridge_auc": 0.915}), Checkpoint("stage1_step1", "1")]
    out = section.diagnostics_section(ckpts, ArtifactLayout.at(tmp_path / "artifacts"), tmp_path / "reports")
    first, second = out["rows"]
    assert first["cells"][0] == "0.92" and first["cells"][1] == "n/a" and second["cells"] is None
    assert (tmp_path / "reports" / first["contact_sheet"]).is_file() and first["overlay_name"] == "k"
    assert second["contact_sheet"] is None


# ---------------------------------------------------------------- on a tiny release


@pytest.fixture(scope="module")
def pipe(bagel_release):
    from flows.params import load_params
    from model.pipeline import load_pipeline, pipeline_settings

    return load_pipeline(bagel_release, pipeline_settings(load_params("params.yaml").model))


def test_bridge_relevance_gives_one_value_per_reference_token_and_changes_nothing(pipe):
    import torch

    from data.render import render_array

    case = distinction_case()
    refs = [render_array(case.references[0]), render_array(Scene("snow"))]
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    s = pipe.bridge_relevance(refs, case.instruction)
    side, patch = pipe.image_size, pipe.model.config.vit.patch_size
    assert len(s) == 2 and all(x.shape == (side // patch, side // patch) and x.dtype == np.float32 for x in s)
    assert all(np.isfinite(x).all() and (np.abs(x) <= 1 + 1e-6).all() for x in s)  # mean cosines
    np.testing.assert_array_equal(s[0], pipe.bridge_relevance(refs, case.instruction)[0])
    assert all(torch.equal(v, pipe.model.state_dict()[k]) for k, v in before.items()) and not pipe.model.training
    assert pipe.bridge_relevance(refs, "") is None  # no instruction words: nothing to relate to
    assert len(bridge_case(case, s[:1])["references"]) == 1


def _project(tmp_path, overrides: dict | None = None):
    from flows.params import load_params

    art = tmp_path / "artifacts"
    return load_params("params.yaml", {
        "pipeline.artifacts": str(art), "data.root": str(art / "data"), "data.sizes.bench_per_task": "1",
        "data.sizes.srum_prompts": "7", "eval.rounds": "1", "eval.scorings": "1", "eval.sampling.steps": "2",
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **(overrides or {})})


def test_the_step_writes_metrics_pictures_and_logs_to_the_checkpoint_run(pipe, bagel_release, tmp_path):
    """First-round images = the benchmark's own targets: the oracle judges them right; the metrics file, the
    pictures and the run's `diagnostics.*` metrics appear."""
    from data.build import build_dataset
    from data.formats.sconeeval import read_bench
    from registry.tracking import Tracker
    from tasks.diagnostics import diagnostics_step
    from tasks.mlflow_runs import RUN_FILE
    from tasks.paths import Paths

    params = _project(tmp_path)
    paths = Paths.from_params(params)
    build_dataset("sconeeval_bench", params.data)
    cases = read_bench(paths.sconeeval_bench)
    images = paths.score_dir("stage2_step1") / "stage2_step1" / "images_try1"
    for c in cases:
        (images / c.task_type).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths.sconeeval_bench / "targets" / f"{c.key}.png", images / c.task_type / f"{c.key}.png")
    tracker = Tracker(params.registry, tmp_path)
    run_id = tracker.start_run("stage2_step1")
    paths.checkpoint("stage2_step1").mkdir(parents=True)
    (paths.checkpoint("stage2_step1") / RUN_FILE).write_text(json.dumps({"run_id": run_id}))

    result = diagnostics_step(params, "stage2_step1", pipe)
    flat = json.loads(paths.diagnostics_metrics("stage2_step1").read_text())
    assert flat == headline(result) and flat["bridge_cases"] == len(cases) == 6
    assert 0.0 <= flat["bridge_auc"] <= 1.0 and flat["self_oracle_global_n"] == 6
    assert result["self_vs_oracle"]["regions"]["n"] >= 6  # every target subject is a region both judges score
    folder = paths.diagnostics_dir("stage2_step1")
    assert (folder / "contact_sheet.png").is_file() and (folder / result["pictures"]["overlay"]).is_file()
    assert len(list((folder / "overlays").glob("*.png"))) == 6
    assert json.loads((folder / "diagnostics.json").read_text())["cases"] == 6
    logged = tracker.client.get_run(run_id).data.metrics
    assert logged[f"{DIAG_PREFIX}bridge_auc"] == pytest.approx(flat["bridge_auc"])
    assert {a.path for a in tracker.client.list_artifacts(run_id, "diagnostics")} >= {"diagnostics/contact_sheet.png"}
    assert set(result["seconds"]) == {"bridge", "judges", "total"}


@pytest.mark.slow
def test_the_evaluate_step_writes_the_diagnostics(bagel_release, tmp_path):
    from bagel_release import copy_release
    from data.build import build_dataset
    from model.bagel.release import mark_release
    from tasks.evaluate import evaluate_step
    from tasks.paths import Paths

    params = _project(tmp_path)
    needed = ["sconeeval_bench", "srum_prompts", "mico_bench", "mige_bench"]
    if hasattr(params.data.sizes, "und_heldout"):
        params.data.sizes.und_heldout = 8
        needed.append("und_heldout")
    for name in needed:
        build_dataset(name, params.data)
    mark_release(copy_release(bagel_release, Paths.from_params(params).checkpoint("stage1_step1")))
    evaluate_step(params, "stage1_step1")
    paths = Paths.from_params(params)
    flat = json.loads(paths.diagnostics_metrics("stage1_step1").read_text())
    assert flat["bridge_cases"] == 6 and flat["self_oracle_global_n"] == 6
    assert (paths.diagnostics_dir("stage1_step1") / "contact_sheet.png").is_file()
    assert (paths.score_dir("stage1_step1") / "stage1_step1" / "summary.json").is_file()  # SconeEval beside it
