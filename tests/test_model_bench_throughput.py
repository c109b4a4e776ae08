"""`scone bench train-throughput` (benchmarks.train_throughput) on the BAGEL family: a fresh release of params' preset,
or params' release, timed on the built datasets."""
import json
from pathlib import Path

import pytest

from data.build import build_dataset
from flows.params import load_params
from benchmarks import train_throughput as bench_throughput

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    p = load_params(ROOT / "params.yaml", [f"data.root={root}", "data.sizes.base=8", "data.sizes.multi_candidate=4",
                                          "train.micro_batch=2", "model.bootstrap.tokenizer_vocab_size=400"])
    for name in bench_throughput.DATASETS:
        build_dataset(name, p.data)
    return p


@pytest.mark.slow
def test_fresh_release_of_the_preset_is_timed_with_the_bridge_off_and_on(params, tmp_path):
    out = tmp_path / "throughput.json"
    report = bench_throughput.run(params, out, steps=2, warmup=1)
    assert json.loads(out.read_text()) == report
    assert report["release"] == "fresh tiny preset" and report["architecture"]["num_layers"] == 4
    assert report["architecture"]["hidden_size"] == 128 and report["micro_batch"] == 2
    for side in ("bridge_off", "bridge_on"):
        r = report[side]
        assert r["flops_per_step"] > 0 and r["step_s_median"] > 0 and 0 < r["mfu"] < 1
        assert r["samples_per_s"] == pytest.approx(2 / r["step_s_median"], rel=0.01)
    # the bridge only adds a relevance product and a mask: the same matmuls to within a few percent
    assert report["bridge_on"]["flops_per_step"] == pytest.approx(report["bridge_off"]["flops_per_step"], rel=0.05)


def test_a_given_release_is_the_one_timed(params, tmp_path, bagel_release):
    report = bench_throughput.run(params, tmp_path / "t.json", steps=1, warmup=0, release=bagel_release)
    assert report["release"] == str(bagel_release) and report["bridge_off"]["flops_per_step"] > 0

