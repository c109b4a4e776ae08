"""Held-out understanding accuracy per checkpoint (evaluation.understanding, tasks.evaluate) and the stage that
teaches it (params.yaml: und_pretrain first in the chain)."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.build import build_dataset
from data.catalog import UND_HELDOUT
from data.config import DataConfig, DatasetSizes
from data.understanding import QUESTION_TYPES, WORD_TYPES
from evaluation.understanding import (PREFIX, answer_all, evaluate_understanding, flat_metrics, format_summary,
                                      headline, heldout_questions, score)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "bagel-tiny"


def _key(image: np.ndarray, question: str) -> tuple:
    return hashlib.md5(np.ascontiguousarray(image).tobytes()).hexdigest(), question


class Oracle:
    """Answers from the ground truth: the held-out rows' own answers, looked up by image and question."""

    def __init__(self, questions):
        self.truth = {_key(q.image, q.question): q.answer for q in questions}

    def yes_probability(self, images, questions):
        return np.array([1.0 if self.truth[_key(i, q)] == "yes" else 0.0 for i, q in zip(images, questions)])

    def answer(self, images, questions, *, max_new_tokens):
        return [self.truth[_key(i, q)] for i, q in zip(images, questions)]


class AlwaysYes:
    def yes_probability(self, images, questions):
        return np.full(len(questions), 0.9)

    def answer(self, images, questions, *, max_new_tokens):
        return ["yes"] * len(questions)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build_dataset(UND_HELDOUT, DataConfig(root=str(root), seed=3, num_workers=1, sizes=DatasetSizes(und_heldout=12)))
    return root


def test_a_model_answering_from_the_ground_truth_scores_one_on_every_type(data_root):
    questions = heldout_questions(data_root)
    summary, records = evaluate_understanding(Oracle(questions), data_root)
    assert len(records) == len(questions) and all(r["right"] for r in records)
    assert summary["yes_no"] == summary["word"] == 1.0 and summary["yes_rate"] == 0.5
    for t in QUESTION_TYPES:
        assert summary["per_type"][t]["yes_no"] == 1.0 and summary["per_type"][t]["n_yes_no"] >= 2, t
    for t in WORD_TYPES:
        assert summary["per_type"][t]["word"] == 1.0, t
    assert "word" not in summary["per_type"]["presence"]  # no question behind it: left out, not 0
    assert summary["n_yes_no"] + summary["n_word"] == len(questions)


def test_a_model_that_always_says_yes_is_at_chance(data_root):
    summary = score(answer_all(AlwaysYes(), heldout_questions(data_root)))
    assert summary["yes_no"] == 0.5 and summary["yes_rate"] == 1.0 and summary["word"] == 0.0
    assert all(e["yes_no"] == 0.5 for e in summary["per_type"].values())
    line = format_summary("ckpt", summary)
    assert line.startswith("ckpt understanding yes/no 0.500 (presence 0.500") and "one-word 0.000" in line


def test_metric_names_for_dvc_mlflow_and_the_registry_agree(data_root):
    from registry import UNDERSTANDING_PREFIX
    from tasks.register import _flatten

    summary = score(answer_all(AlwaysYes(), heldout_questions(data_root)))
    nested = headline(summary)
    assert nested["yes_no"] == 0.5 and nested["colour"] == {"yes_no": 0.5, "word": 0.0}
    assert "word" not in nested["presence"]
    flat = flat_metrics(summary)
    assert PREFIX == UNDERSTANDING_PREFIX and flat == _flatten(nested, UNDERSTANDING_PREFIX)
    assert flat["understanding.yes_no"] == 0.5 and flat["understanding.count.yes_no"] == 0.5


def test_greedy_answers_follow_the_answer_logits():
    from model.pipeline import load_pipeline

    pipe = load_pipeline(FIXTURE / "release")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    questions = ["what colour is the circle", "is there a red circle", "what place is this"]
    answers = pipe.answer(images, questions, max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    import torch

    from model.bagel.family import _pixels

    for image, question, answer in zip(images, questions, answers):
        with torch.no_grad():
            logits = pipe.model.answer_logits([_pixels(image, pipe.image_size)], pipe.tokenizer.encode(question))
        first = int(logits.argmax())
        if first == pipe.model.special.eos:
            assert answer == ""
        else:  # the greedy answer starts with the most likely first token
            assert pipe.tokenizer.encode(answer)[:1] == [first] or answer.startswith(pipe.tokenizer.hf.decode([first]).strip())


def test_und_pretrain_is_the_first_stage_and_trains_understanding_only():
    from flows.params import load_params

    params = load_params(ROOT / "params.yaml")
    assert params.pipeline.stage_order[0] == "und_pretrain"
    und = params.train.stages["und_pretrain"]
    assert und.datasets == ["und_pretrain"] and und.init_from is None
    assert not und.train_generation and und.train_understanding and und.train_vit and und.und_loss_weight == 1.0
    assert params.train.stages[params.pipeline.stage_order[1]].init_from == "und_pretrain"
    assert not any(params.train.stages[s].train_vit for s in params.pipeline.stage_order[1:])  # frozen after it


def test_only_checkpoints_whose_generation_was_trained_are_generation_models():
    from flows.params import load_params
    from tasks.checkpoints import generation_trained
    from tasks.paths import checkpoint_names

    params = load_params(ROOT / "params.yaml")
    assert {n: generation_trained(params, n) for n in checkpoint_names(params)} == \
        {n: n != "und_pretrain" for n in checkpoint_names(params)}


def test_the_evaluate_step_scores_understanding_alone_before_generation_is_trained(bagel_release, data_root,
                                                                                   tmp_path):
    """und_pretrain's generation expert is the release's: the evaluate step writes its understanding figures (DVC
    metrics, each answer in its scores folder) and empty generation metrics files, and samples nothing."""
    from flows.params import load_params
    from model.bagel.release import mark_release
    from tasks.evaluate import evaluate_step
    from tasks.paths import Paths

    art = tmp_path / "artifacts"
    shutil.copytree(data_root, art / "data")
    params = load_params(ROOT / "params.yaml", {"pipeline.artifacts": str(art), "data.root": str(art / "data"),
                                                "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    paths = Paths.from_params(params)
    small = params.data.model_copy(update={"num_workers": 1, "sizes": DatasetSizes(bench_per_task=1)})
    build_dataset("sconeeval_bench", small)  # what the evaluate step's other figures (diagnostics) read
    shutil.copytree(bagel_release, paths.checkpoint("und_pretrain"))
    mark_release(paths.checkpoint("und_pretrain"))
    out = evaluate_step(params, "und_pretrain")
    figures = json.loads(paths.understanding_metrics("und_pretrain").read_text())
    assert 0.0 <= out["understanding_yes_no"] == figures["yes_no"] <= 1.0
    assert set(figures) >= {"yes_no", "word", "yes_rate", *QUESTION_TYPES}
    answers = json.loads((paths.score_dir("und_pretrain") / "understanding.json").read_text())
    assert len(answers["answers"]) == len(heldout_questions(paths.data))
    assert json.loads(paths.score_metrics("und_pretrain").read_text()) == {}
    assert not (paths.score_dir("und_pretrain") / "und_pretrain").exists()  # no SconeEval run
