"""MICo-Bench and MIGE-Bench per checkpoint: the held-out splits in their layouts, the oracle's figures, the
runner's results layouts, `scone eval aggregate --benchmark mico|mige` and the evaluate step on a tiny release."""
import json

import numpy as np
import pytest

from data.config import DataConfig
from data.formats.mico_bench import read_mico_bench, write_mico_bench
from data.formats.mige_bench import edit_region, read_mige_bench, write_mige_bench
from data.heldout import mico_bench_cases, mige_bench_cases
from data.render import render_array
from evaluation.config import EvalConfig
from evaluation.heldout_runner import evaluate_heldout
from evaluation.mico import score_row
from evaluation.oracle_scores import SceneOracle


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    cfg = DataConfig()
    write_mico_bench(mico_bench_cases(cfg), root / "mico_bench")
    write_mige_bench(mige_bench_cases(cfg), root / "mige_bench")
    return root


@pytest.fixture(scope="module")
def oracle():
    return SceneOracle(EvalConfig())


def far_from(image: np.ndarray) -> np.ndarray:
    """Every pixel repainted: black where the pixel is bright, white where it is dark (RGB distance >= 220)."""
    bright = image.astype(int).sum(axis=-1, keepdims=True) >= 3 * 128
    return np.where(bright, np.zeros_like(image), np.full_like(image, 255))


# ---------------------------------------------------------------- the splits and their layouts


def test_splits_cover_every_group_and_edit_and_read_back(benches):
    mico = read_mico_bench(benches / "mico_bench")
    assert len(mico) == 8  # one per MICo sub-task, one De&Re
    assert sorted({c.meta["category"] for c in mico}) == ["De&Re", "HOI", "Object", "Person"]
    assert all(len(c.references) <= DataConfig().max_references for c in mico)
    for c in mico:  # faces are exactly the character sources
        faces = [i for i, r in enumerate(c.references) if r.placements and r.placements[0].subject.domain == "character"]
        assert c.meta["face_indices"] == faces
        assert (benches / "mico_bench" / "references" / f"{c.key}.png").is_file()
    mige = read_mige_bench(benches / "mige_bench")
    assert [c.meta["edit_type"] for c in mige] == ["addition"] * 4 + ["replacement"] * 4
    assert [c.meta["idx"] for c in mige] == [0, 1, 2, 3] * 2
    item = json.loads((benches / "mige_bench" / "data.jsonl").read_text().splitlines()[0])
    assert item["image"] == "add/add_target/0_target.png" and item["mask_path"] == ["add/add_mask/0_mask.png"]
    assert item["entity_path"][1] == item["source_path"][0]  # addition: "add <imagehere> ... of <imagehere>"
    assert item["multi_prompt"].count("<imagehere>") == len(item["entity_path"]) == 2
    # no held-out subject appears in a training row's stream: the held-out quarter of the world
    from data.world import is_held_out

    assert all(is_held_out(p.subject.category, p.subject.colour, p.subject.texture)
               for c in mico + mige for r in c.references for p in r.placements)


def test_mige_layout_reads_the_release_json_list(benches, tmp_path):
    """MIGEBench's own file is one JSON list whose items name their edit type only by folder."""
    import shutil

    root = tmp_path / "MIGEBench"
    shutil.copytree(benches / "mige_bench", root)
    items = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    for item in items:
        for k in ("edit_type", "key", "instruction", "input_images"):
            item.pop(k)
    (root / "data.jsonl").unlink()
    (root / "ground_truth.jsonl").unlink()
    (root / "bench.json").write_text(json.dumps(items))
    cases = read_mige_bench(root)
    assert [c.meta["edit_type"] for c in cases] == ["addition"] * 4 + ["replacement"] * 4
    assert cases[4].key == "replacement_0000" and cases[4].target is None
    assert cases[4].meta["source_image"] == 0 and cases[0].meta["source_image"] == 1


# ---------------------------------------------------------------- the oracle's figures


def test_an_edit_that_keeps_the_source_preserves_it_fully_and_one_that_repaints_it_preserves_nothing(benches, oracle):
    for case in read_mige_bench(benches / "mige_bench"):
        source = render_array(case.references[case.meta["source_image"]])
        unchanged = oracle.mige(case, source)
        assert unchanged["preservation"] == pytest.approx(10.0)
        assert unchanged["subject_fidelity"] == 0.0 and unchanged["instruction_following"] == 0.0  # no edit made
        repainted = oracle.mige(case, far_from(source))
        assert repainted["preservation"] == 0.0
        perfect = oracle.mige(case, render_array(case.target))
        assert {k: perfect[k] for k in ("subject_fidelity", "instruction_following", "preservation")} == \
            pytest.approx({"subject_fidelity": 10.0, "instruction_following": 10.0, "preservation": 10.0})
        assert perfect["L1"] == 0.0 and unchanged["L1"] > 0.0
        # the edited region is where source and ground truth differ, nowhere else
        differ = np.any(source != render_array(case.target), axis=-1)
        assert not (differ & ~edit_region(case)).any()


def test_a_replacement_that_leaves_the_old_subject_follows_the_instruction_less(benches, oracle):
    from dataclasses import replace

    from data.scene import Placement

    for case in [c for c in read_mige_bench(benches / "mige_bench") if c.meta["edit_type"] == "replacement"]:
        source = case.references[case.meta["source_image"]]
        old = next(p for p in source.placements if p.subject.uid == case.meta["replaced"])
        side = old.bbox[2] - old.bbox[0]
        corner = (32 - side, 32 - side, 32, 32) if old.bbox[0] < 16 else (0, 32 - side, side, 32)
        both = replace(case.target, placements=case.target.placements + (Placement(old.subject, corner),))
        kept = oracle.mige(case, render_array(both))
        assert kept["subject_fidelity"] > 5.0  # the new subject is there ...
        assert kept["instruction_following"] < 7.5, kept["reason"]  # ... but the old one was not taken out
        assert "removal" in kept["reason"]
        assert oracle.mige(case, render_array(source))["instruction_following"] == 0.0


def test_mico_perfect_render_scores_about_100_and_noise_nothing(benches, oracle):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for case in read_mico_bench(benches / "mico_bench"):
        judged = oracle.mico(case, render_array(case.target))
        assert len(judged["sources"]) == len(case.references)
        for i in case.meta["face_indices"]:  # faces are graded by identity similarity, the others present / absent
            assert judged["sources"][i]["identity_similarity"] == pytest.approx(1.0)
        assert judged["PF"] == pytest.approx(10.0) and judged["SR"] == pytest.approx(10.0)
        assert judged["naturalness"] == pytest.approx(10.0) and judged["artifacts"] > 9.7
        scored = score_row({**judged, "category": case.meta["category"]})
        assert scored["W"] == 1.0 and scored["score"] > 98.5
        bad = oracle.mico(case, noise)
        assert score_row({**bad, "category": case.meta["category"]})["score"] == 0.0
        assert all(s.get("present", 0) == 0 and s.get("identity_similarity") is None for s in bad["sources"])
        assert bad["artifacts"] < 4.0 and bad["naturalness"] < 4.0


def test_oracle_needs_the_scene_graphs(benches, oracle, tmp_path):
    import shutil

    shutil.copytree(benches / "mico_bench", tmp_path / "m")
    (tmp_path / "m" / "ground_truth.jsonl").unlink()
    case = read_mico_bench(tmp_path / "m")[0]
    with pytest.raises(ValueError, match="ground_truth.jsonl"):
        oracle.mico(case, np.zeros((32, 32, 3), np.uint8))


# ---------------------------------------------------------------- runner, layouts, aggregate CLI


def perfect(cases):
    """A generator that draws every case's ground truth, recognising the case by its input images."""
    from evaluation.runner import reference_images

    truth = {tuple(r.tobytes() for r in reference_images(c)): c.target for c in cases}
    calls = []

    def generate_fn(examples, seed):
        calls.append((len(examples), seed))
        return [render_array(truth[tuple(r.tobytes() for r in e.refs)]) for e in examples]

    return generate_fn, calls


def test_runner_generates_once_and_writes_both_layouts(benches, tmp_path):
    from flows.cli import main

    mico, mige = read_mico_bench(benches / "mico_bench"), read_mige_bench(benches / "mige_bench")
    gen, calls = perfect(mico + mige)
    out = tmp_path / "scores" / "stage1_step1"
    s = evaluate_heldout(gen, mico, mige, out, EvalConfig(seed=7), "stage1_step1")
    assert calls == [(16, 7)]  # one round, every case of both benchmarks in one call
    assert s["mico"]["overall"]["score"] > 98.5 and s["mico"]["missing_categories"] == []
    assert s["mige"]["overall"]["score"] == pytest.approx(10.0)
    assert s["mige"]["per_edit"]["replacement"]["n_cases"] == 4
    assert (out / "mico" / "images" / "hoi" / "person_object_0000.png").is_file()
    assert (out / "mige" / "add" / "0.png").is_file() and (out / "mige" / "replace" / "3.png").is_file()
    lines = [json.loads(l) for l in (out / "mico" / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {"sources", "PF", "SR", "naturalness", "artifacts", "W", "score"} <= set(lines[0])
    assert json.loads((out / "mige" / "summary.json").read_text())["judge"] == "oracle"
    assert (out / "mico" / "table.md").read_text().splitlines()[0] == "| Model | Overall | Object | Person | HOI | De&Re |"
    # the aggregate CLI reads each layout back (as it reads trees other tools wrote)
    assert main(["eval", "aggregate", "--benchmark", "mico", str(out / "mico"), "--out", str(tmp_path / "mico.json")]) == 0
    again = json.loads((tmp_path / "mico.json").read_text())
    assert again["overall"]["score"] == pytest.approx(s["mico"]["overall"]["score"])
    assert main(["eval", "aggregate", "--benchmark", "mige", "--results-dir", str(out), "--model", "mige",
                 "--out", str(tmp_path / "mige.json")]) == 0
    assert json.loads((tmp_path / "mige.json").read_text())["overall"]["score"] == pytest.approx(10.0)
    assert main(["eval", "aggregate", "--benchmark", "mige", str(tmp_path / "nothing")]) == 2


def test_aggregate_reads_a_mige_tree_with_the_papers_metrics(tmp_path, capsys):
    """Another tool's tree: one file per edit folder, MIGE's feature metrics, no oracle figures."""
    from flows.cli import main

    for folder, dino in (("add", [0.9, 0.7]), ("replace", [0.6, 0.8])):
        (tmp_path / "m" / folder).mkdir(parents=True)
        (tmp_path / "m" / folder / "metrics.jsonl").write_text(
            "".join(json.dumps({"idx": i, "DINO": d, "CLIP-I": 0.9}) + "\n" for i, d in enumerate(dino)))
    assert main(["eval", "aggregate", "--benchmark", "mige", str(tmp_path / "m"), "--out", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["per_edit"]["addition"]["DINO"] == pytest.approx(0.8) and s["overall"]["DINO"] == pytest.approx(0.75)
    assert "score" not in s["overall"] and s["overall"]["n_cases"] == 4


# ---------------------------------------------------------------- the evaluate step on a tiny release


@pytest.mark.slow
def test_evaluate_step_scores_mico_and_mige_beside_sconeeval(bagel_release, tmp_path):
    from bagel_release import copy_release
    from data.build import build_dataset
    from flows.params import load_params
    from model.bagel.release import mark_release
    from tasks.evaluate import evaluate_step
    from tasks.paths import Paths

    art = tmp_path / "artifacts"
    params = load_params("params.yaml", {
        "pipeline.artifacts": str(art), "data.root": str(art / "data"), "data.sizes.bench_per_task": "1",
        "data.sizes.srum_prompts": "7", "eval.rounds": "1", "eval.scorings": "1", "eval.sampling.steps": "2",
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    needed = ["sconeeval_bench", "srum_prompts", "mico_bench", "mige_bench"]
    if hasattr(params.data.sizes, "und_heldout"):  # every checkpoint's understanding is scored in the same step
        params.data.sizes.und_heldout = 8
        needed.append("und_heldout")
    for name in needed:
        build_dataset(name, params.data)
    mark_release(copy_release(bagel_release, art / "checkpoints" / "stage1_step1"))
    out = evaluate_step(params, "stage1_step1")
    paths = Paths.from_params(params)
    assert 0.0 <= out["mico"] <= 100.0 and 0.0 <= out["mige"] <= 10.0
    for benchmark in ("mico", "mige"):
        summary = json.loads((paths.heldout_scores("stage1_step1", benchmark) / "summary.json").read_text())
        assert summary["n_cases"] == 8 and summary["rounds"] == 1
        metrics = json.loads(paths.heldout_metrics("stage1_step1", benchmark).read_text())
        assert f"{benchmark}_overall" in metrics
    assert (paths.score_dir("stage1_step1") / "stage1_step1" / "summary.json").is_file()  # SconeEval beside them
    assert len(list((paths.heldout_scores("stage1_step1", "mico") / "images").glob("*/*.png"))) == 8
