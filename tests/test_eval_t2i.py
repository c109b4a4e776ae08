"""Compositional T2I accuracy on SRUM prompts: perfect renders score 1, wrong images lose exactly what they get wrong."""
from dataclasses import replace

import numpy as np
import pytest

from data.render import render_array
from data.scene import Placement, Scene, Subject
from evaluation.t2i import CATEGORIES, canonical_category, score_image, t2i_accuracy


def subj(uid, category, colour, texture="plain", domain="object"):
    return Subject(uid, domain, category, colour, texture, "large")


RED = subj("r", "circle", "red", "striped")
BLUE = subj("b", "square", "blue", "dotted")
ROBOT = subj("g", "robot", "green", domain="character")
PAIR = Scene("beach", (Placement(RED, (2, 10, 12, 20)), Placement(BLUE, (20, 10, 30, 20))))
THREE = Scene("city", tuple(Placement(replace(RED, uid=f"r{k}"), (2 + 10 * k, 4, 10 + 10 * k, 12)) for k in range(3)))
CHAR = Scene("snow", (Placement(ROBOT, (4, 6, 16, 26)), Placement(BLUE, (18, 12, 28, 22))))


def row(key, category, scene):
    return {"key": key, "category": category, "prompt": "", "target": scene.to_dict()}


def test_perfect_renders_score_one_in_every_category():
    rows = [row("1", "color", PAIR), row("2", "shape", CHAR), row("3", "texture", PAIR), row("4", "spatial", PAIR),
            row("5", "numeracy", THREE), row("6", "non_spatial", CHAR), row("7", "complex", CHAR)]
    res = t2i_accuracy(rows, [render_array(Scene.from_dict(r["target"])) for r in rows])
    assert res["per_category"] == {c: 1.0 for c in CATEGORIES} and res["mean"] == 1.0
    assert res["n"] == {c: 1 for c in CATEGORIES}


def test_wrong_images_lose_their_category():
    swapped = Scene("beach", (Placement(RED, (20, 10, 30, 20)), Placement(BLUE, (2, 10, 12, 20))))
    shapes_swapped = Scene("beach", (Placement(replace(RED, category="square"), (2, 10, 12, 20)),
                                     Placement(replace(BLUE, category="circle"), (20, 10, 30, 20))))
    plain = Scene("beach", tuple(Placement(replace(p.subject, texture="plain"), p.bbox) for p in PAIR.placements))
    two = Scene("city", THREE.placements[:2])
    person = Scene("snow", (Placement(replace(ROBOT, category="person"), (4, 6, 16, 26)), CHAR.placements[1]))
    rows = [row("c", "colour", PAIR), row("s", "spatial", PAIR), row("n", "numeracy", THREE),
            row("h", "shape", CHAR), row("t", "texture", PAIR), row("x", "complex", CHAR), row("p", "shape", PAIR)]
    images = [render_array(s) for s in (shapes_swapped, swapped, two, person, plain, person, shapes_swapped)]
    res = t2i_accuracy(rows, images)
    # colour binding: the red blob must be the circle, the blue one the square: both wrong
    assert res["per_prompt"][0]["score"] == 0.0
    assert res["per_category"]["spatial"] == 0.0 and res["per_category"]["numeracy"] == 0.0
    assert res["per_category"]["texture"] == 0.0
    # shape: robot drawn as a person (1 of 2 wrong) and both shapes swapped (2 of 2 wrong) -> (0.5 + 0) / 2
    assert res["per_category"]["shape"] == pytest.approx(0.25)
    # complex: binding 1/2, the left/right pair and the counts are right -> (0.5 + 1 + 1) / 3
    assert res["per_category"]["complex"] == pytest.approx(5 / 6)
    assert res["per_prompt"][2]["counts"] == [{"colour": "red", "expected": 3, "generated": 2, "ok": False}]


def test_blank_image_scores_zero():
    for category, scene in [("colour", PAIR), ("numeracy", THREE), ("complex", CHAR), ("spatial", PAIR)]:
        assert score_image(scene, np.zeros((32, 32, 3), np.uint8), category)["score"] == 0.0


def test_srum_prompt_file_round_trip(tmp_path):
    from data.build import build_dataset
    from data.config import DataConfig
    from data.formats.srum_prompts import read_prompts

    build_dataset("srum_prompts", DataConfig(root=str(tmp_path), sizes={"srum_prompts": 14}))
    rows = read_prompts(tmp_path / "srum_prompts" / "prompts.jsonl")
    perfect = t2i_accuracy(rows, [render_array(r["target"]) for r in rows])
    assert set(perfect["per_category"]) == set(CATEGORIES) and perfect["mean"] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (len(rows), 32, 32, 3), dtype=np.uint8)
    assert t2i_accuracy(rows, list(noise))["mean"] == 0.0


def test_category_names_and_errors():
    assert canonical_category("Color") == "colour" and canonical_category("non_spatial") == "non-spatial"
    with pytest.raises(ValueError, match="unknown T2I category"):
        canonical_category("3d-spatial")
    with pytest.raises(ValueError, match="2 prompt rows but 1 images"):
        t2i_accuracy([row("a", "colour", PAIR)] * 2, [np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="no target scene"):
        t2i_accuracy([{"key": "a", "category": "colour", "prompt": ""}], [np.zeros((32, 32, 3), np.uint8)])


def test_evaluate_t2i_generates_one_image_per_prompt_without_references():
    from evaluation.t2i import evaluate_t2i

    rows = [dict(row("a", "colour", PAIR), prompt="a striped red circle and a dotted blue square"),
            dict(row("b", "numeracy", THREE), prompt="three striped red circles")]
    targets = {r["prompt"]: Scene.from_dict(r["target"]) for r in rows}
    seen = []

    def generate_fn(examples, seed):
        seen.append((seed, [len(e.refs) for e in examples]))
        return [render_array(targets[e.instruction]) if seed == 7 else np.zeros((32, 32, 3), np.uint8) for e in examples]

    assert evaluate_t2i(generate_fn, rows, seed=7)["mean"] == 1.0
    assert seen == [(7, [0, 0])]
    assert evaluate_t2i(generate_fn, rows, seed=0)["mean"] == 0.0
