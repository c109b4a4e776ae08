"""The evaluation runner: protocol rounds x scorings, files, summary, with fake generators."""
import json

import numpy as np
import pytest

from data.render import render_array
from evaluation.config import EvalConfig
from evaluation.judges.oracle import OracleJudge
from evaluation.runner import evaluate_checkpoint
from evaluation.sconeeval import aggregate
from test_eval_oracle import distinction_case, multi_case


def perfect_then_blank(cases):
    """Round seed 0 renders every target exactly; any other seed draws a black image."""
    by_instruction = {c.instruction: c.target for c in cases}
    calls = []

    def generate_fn(examples, seed):
        calls.append((len(examples), seed))
        assert all(len(e.refs) == 2 and e.target is None for e in examples)
        if seed == 0:
            return [render_array(by_instruction[e.instruction]) for e in examples]
        return [np.zeros((32, 32, 3), np.uint8) for _ in examples]

    return generate_fn, calls


class CountingJudge(OracleJudge):
    def __init__(self, deterministic):
        super().__init__()
        self.deterministic = deterministic
        self.calls = 0

    def composition(self, case, image):
        self.calls += 1
        return super().composition(case, image)


def test_protocol_files_and_hand_computed_summary(tmp_path):
    cases = [distinction_case(), multi_case()]
    gen, calls = perfect_then_blank(cases)
    cfg = EvalConfig(rounds=2, scorings=2, seed=0)
    (tmp_path / "tiny" / "score_try9" / "composition_single").mkdir(parents=True)  # stale, must go
    judge = CountingJudge(deterministic=True)
    s = evaluate_checkpoint(gen, cases, tmp_path, "tiny", cfg, judge)
    assert calls == [(2, 0), (2, 1)]  # one call per round, seeds eval.seed + r
    assert judge.calls == 4  # deterministic: judged once per round, reused for the second scoring
    model_dir = tmp_path / "tiny"
    for r in (1, 2):
        assert (model_dir / f"images_try{r}" / "distinction_cross" / "d1.png").is_file()
        assert (model_dir / f"images_try{r}" / "composition_multi" / "m1.png").is_file()
    assert sorted(p.name for p in model_dir.glob("score_try*")) == ["score_try1", "score_try2", "score_try3", "score_try4"]
    lines = [json.loads(l) for l in (model_dir / "score_try3" / "distinction_cross" / "score.jsonl").read_text().splitlines()]
    assert lines[0]["round"] == 2 and lines[0]["scoring"] == 1 and lines[0]["seed"] == 1
    assert lines[0]["output_image_path"] == "images_try2/distinction_cross/d1.png"
    # groups: perfect, perfect (COM 10, DIS 10, Overall 10), blank, blank (COM 0; DIS: labels [1, 0],
    # nothing predicted -> acc 5, F1 0 -> 2.5; Overall 1.25)
    assert s["groups"] == 4
    # PF and SC: 10 in the perfect groups, 0 in the blank ones
    assert s["average"] == pytest.approx({"COM": 5.0, "DIS": 6.25, "Overall": 5.625, "PF": 5.0, "SC": 5.0})
    assert s["std"] == pytest.approx({"COM": 5.0, "DIS": 3.75, "Overall": 4.375, "PF": 5.0, "SC": 5.0})
    assert s["seeds"] == [0, 1] and s["judge"] == "oracle" and s["n_cases"] == 2
    assert s["sample_images"] == ["images_try1/distinction_cross/d1.png", "images_try1/composition_multi/m1.png"]
    on_disk = json.loads((model_dir / "summary.json").read_text())
    assert on_disk["average"]["Overall"] == pytest.approx(5.625)
    assert aggregate(tmp_path, "tiny")["average"] == pytest.approx(s["average"])
    assert (model_dir / "table3.md").read_text().splitlines()[2] == (
        "| tiny | - | 5.00±5.00 | 5.00±5.00 | 6.25±3.75 | - | - | - | - | - | - | 5.00±5.00 | 6.25±3.75 | 5.62±4.38 |"
    )


def test_non_deterministic_judge_is_asked_every_scoring(tmp_path):
    cases = [distinction_case()]
    gen, _ = perfect_then_blank(cases)
    judge = CountingJudge(deterministic=False)
    s = evaluate_checkpoint(gen, cases, tmp_path, "m", EvalConfig(rounds=1, scorings=3), judge)
    assert judge.calls == 3 and s["groups"] == 3 and s["std"]["Overall"] == 0.0


def test_runner_rejects_bad_generators_and_empty_benchmarks(tmp_path):
    with pytest.raises(ValueError, match="no benchmark cases"):
        evaluate_checkpoint(lambda ex, seed: [], [], tmp_path, "m", EvalConfig(rounds=1), OracleJudge())
    with pytest.raises(RuntimeError, match="returned 0 images for 1"):
        evaluate_checkpoint(lambda ex, seed: [], [distinction_case()], tmp_path, "m", EvalConfig(rounds=1), OracleJudge())


@pytest.mark.slow
def test_untrained_checkpoint_end_to_end(bagel_release, tmp_path):
    """Benchmark folder + a tiny release (fresh weights) -> the whole evaluation, as the flows run it."""
    from data.build import bench_cases
    from data.config import DataConfig
    from data.formats.sconeeval import write_bench
    from evaluation.runner import evaluate_checkpoint_dir
    from model.config import ModelConfig
    from model.pipeline import pipeline_settings

    write_bench(bench_cases(DataConfig(sizes={"bench_per_task": 1})), tmp_path / "bench")
    cfg = EvalConfig(rounds=1, scorings=2, sampling={"steps": 2, "batch_size": 4})
    s = evaluate_checkpoint_dir(bagel_release, tmp_path / "bench", tmp_path / "out", cfg, model_name="tiny",
                                pipeline_settings=pipeline_settings(ModelConfig()))
    assert s["groups"] == 2 and s["missing_task_types"] == [] and s["n_cases"] == 6
    assert 0.0 <= s["average"]["Overall"] <= 10.0 and s["average"]["COM"] < 5.0  # noise is no composition
    assert len(list((tmp_path / "out" / "tiny" / "images_try1").glob("*/*.png"))) == 6
