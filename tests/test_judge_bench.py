"""`scone bench judge` at toy scale: legs, request counts, extrapolation flags, cache re-run."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.judge import requests_per_case, run, synthesize
from data.config import DataConfig
from data.formats.sconeeval import read_bench, write_bench
from data.render import render_array
from evaluation.config import EvalConfig
from flows.params import PipelineConfig
from test_eval_oracle import distinction_case, multi_case


@pytest.fixture
def params(tmp_path):
    write_bench([distinction_case(), multi_case()], tmp_path / "data" / "sconeeval_bench")
    return SimpleNamespace(data=DataConfig(root=str(tmp_path / "data")), eval=EvalConfig(),
                           pipeline=PipelineConfig(artifacts=str(tmp_path / "artifacts")))


def test_synthesised_cases_have_distinct_keys_and_images(params):
    base = read_bench(f"{params.data.root}/sconeeval_bench")
    cases, images = synthesize(base, 5)
    assert [c.key for c in cases] == ["d1_x00", "m1_x00", "d1_x01", "m1_x01", "d1_x02"]
    np.testing.assert_array_equal(images[0], render_array(base[0].target))  # copy 0 is the exact render
    assert len({im.tobytes() for im in images}) == 5
    assert int(np.abs(images[2].astype(int) - images[0]).max()) <= 6
    assert [requests_per_case(c) for c in base] == [4, 2]  # d1: PF, SC, two candidates; m1: PF, SC


@pytest.mark.slow
def test_bench_legs_counts_and_cache_rerun(params, tmp_path):
    out = tmp_path / "bench" / "judge.json"
    r = run(params, out, n_cases=8, latency_s=0.01, concurrency=4, sequential_cases=2)
    assert json.loads(out.read_text()) == r
    assert r["requests_expected"] == 4 * 4 + 4 * 2
    assert r["judge_calls"] == {"composition": 8, "presence": 8}
    assert r["concurrent"]["server_requests"] == 24 and r["concurrent"]["server_max_in_flight"] <= 4
    assert r["sequential"]["server_requests"] == 6 and r["sequential"]["server_max_in_flight"] == 1
    assert r["sequential"]["extrapolated"] is True and r["sequential"]["measured_cases"] == 2
    assert r["sequential"]["judge_s_all_cases"] == pytest.approx(r["sequential"]["seconds_per_request"] * 24, rel=1e-2)
    assert r["scores_identical"] is True and r["scores_compared_cases"] == 2
    assert r["cache_rerun_requests"] == 0 and r["cache_rerun_identical"] is True
    assert r["cached_rerun"]["judge_usage"]["cache_hits"] == 24
    assert r["concurrent"]["judge_usage"]["prompt_tokens"] > 0 and r["speedup"] > 0
