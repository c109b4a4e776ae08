"""On-disk formats: Scone-S2I shards, the SconeEval layout, SRUM prompts and rewards."""
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.formats import scone_s2i, sconeeval, srum_prompts, srum_rewards
from data.instructions import TemplateWriter
from data.records import TASK_TYPES
from data.render import render_array
from data.world import World


@pytest.fixture(scope="module")
def cases():
    w = World(11, "fmt", split="train", image_size=32, writer=TemplateWriter())
    return [w.case(f"k{i:03d}", TASK_TYPES[i % 6], 4) for i in range(22)]


def test_scone_layout_round_trip_and_row_groups(cases, tmp_path):
    files = scone_s2i.write_dataset(cases, tmp_path, "demo", rows_per_row_group=4, rows_per_file=12)
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    info = json.loads((tmp_path / "parquet_info" / "demo.json").read_text())
    # 22 rows, 12 per file, 4 per group: 3 + 3 groups (the last group holds 2 rows)
    assert info == {
        "parquet_data/demo/part-00000.parquet": {"num_row_groups": 3},
        "parquet_data/demo/part-00001.parquet": {"num_row_groups": 3},
    }
    for rel, meta in info.items():
        assert pq.ParquetFile(tmp_path / rel).num_row_groups == meta["num_row_groups"] > 1
    assert scone_s2i.read_cases(tmp_path, "demo") == cases


def test_a_shard_reads_like_the_scone_loader_reads_it(cases, tmp_path):
    scone_s2i.write_dataset(cases, tmp_path, "demo", rows_per_row_group=8)
    info = json.loads((tmp_path / "parquet_info" / "demo.json").read_text())
    seen = 0
    for rel, meta in info.items():
        pf = pq.ParquetFile(tmp_path / rel)
        for g in range(meta["num_row_groups"]):
            table = pf.read_row_group(g)
            for row in table.to_pylist():
                case = cases[seen]
                images = [Image.open(io.BytesIO(b)).convert("RGB") for b in row["image"]]
                assert len(images) == len(case.references) + 1
                assert (np.asarray(images[-1]) == render_array(case.target)).all()  # last = target
                assert (np.asarray(images[0]) == render_array(case.references[0])).all()
                assert row["instruction"] == case.instruction
                seen += 1
    assert seen == len(cases)


def test_rewriting_a_smaller_dataset_leaves_no_stale_shards(cases, tmp_path):
    scone_s2i.write_dataset(cases, tmp_path, "demo", rows_per_row_group=2, rows_per_file=4)
    scone_s2i.write_dataset(cases[:3], tmp_path, "demo", rows_per_row_group=2, rows_per_file=4)
    assert len(list((tmp_path / "parquet_data" / "demo").glob("*.parquet"))) == 1
    assert [r["key"] for r in scone_s2i.iter_rows(tmp_path, "demo")] == [c.key for c in cases[:3]]


def test_reader_accepts_absolute_paths_of_a_released_info_file(cases, tmp_path):
    scone_s2i.write_dataset(cases[:4], tmp_path, "demo", rows_per_row_group=2)
    info_file = tmp_path / "parquet_info" / "demo.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({f"/your_data_path/{k}": v for k, v in info.items()}))
    assert len(list(scone_s2i.iter_rows(tmp_path, "demo"))) == 4


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="build the dataset first"):
        list(scone_s2i.iter_rows(tmp_path, "nothing"))


def test_sconeeval_layout_round_trip(cases, tmp_path):
    bench = tmp_path / "bench"
    sconeeval.write_bench(cases, bench)
    lines = [json.loads(x) for x in (bench / "data.jsonl").read_text().splitlines()]
    assert set(lines[0]) == set(sconeeval.DATA_FIELDS)
    assert lines[0]["input_images"] == [f"images/k000_{i}.png" for i in range(1, len(cases[0].references) + 1)]
    back = sconeeval.read_bench(bench)
    for a, b in zip(cases, back):
        imgs = sconeeval.load_inputs(b)
        assert (np.asarray(imgs[-1]) == render_array(a.references[-1])).all()
        assert b.meta.pop("input_images")
        assert a == b
    # without ground truth (a real SconeEval download) the public fields still load
    (bench / "ground_truth.jsonl").unlink()
    bare = sconeeval.read_bench(bench)
    assert [c.subject_label for c in bare] == [c.subject_label for c in cases]
    assert bare[0].target is None and bare[0].references == [None] * len(cases[0].references)


def test_srum_rewards_round_trip(tmp_path):
    records = [
        {
            "key": "p0",
            "prompt": "a red circle at the beach",
            "vlm_rewards": [
                {"object": "global_layout_reward", "bbox": [0, 0, 32, 32], "score": 0.8, "reason": "matches"},
                {"object": "a red circle", "bbox": [2, 13, 15, 26], "score": 0.95},
            ],
        },
        {"key": "p1", "vlm_rewards": [{"object": "global_layout_reward", "score": -0.5}]},
    ]
    path = srum_rewards.write_rewards(tmp_path / "r.jsonl", records)
    back = srum_rewards.read_rewards(path)
    assert back[0] == records[0]
    assert back[1] == records[1]


def test_malformed_reward_lines_are_reported_with_line_numbers(tmp_path):
    good = json.dumps({"vlm_rewards": [{"object": "x", "bbox": [0, 0, 1, 1], "score": 0.1}]})
    lines = [
        good,
        "{not json",
        json.dumps({"vlm_rewards": [{"object": "x", "bbox": [0, 0, 1], "score": 0.1}]}),
        good,
        json.dumps({"vlm_rewards": [{"object": "x", "bbox": [0, 0, 1, 1], "score": 3}]}),
        json.dumps({"key": "no rewards"}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(srum_rewards.RewardFileError) as err:
        srum_rewards.read_rewards(path)
    msg = str(err.value)
    assert "4 malformed line(s)" in msg
    for n in (2, 3, 5, 6):
        assert f"line {n}:" in msg
    assert "line 1:" not in msg and "line 4:" not in msg
    assert "bbox" in msg and "vlm_rewards" in msg
    with pytest.raises(srum_rewards.RewardFileError, match="has no bbox"):
        srum_rewards.write_rewards(tmp_path / "x.jsonl", [{"vlm_rewards": [{"object": "cat", "score": 0.0}]}])


def test_srum_prompts_have_exact_targets(tmp_path):
    w = World(5, "srum", split="train", image_size=32, writer=TemplateWriter())
    rows = srum_prompts.make_prompts(w, 21)
    assert [r["category"] for r in rows[:7]] == list(srum_prompts.CATEGORIES)
    path = srum_prompts.write_prompts(rows, tmp_path / "prompts.jsonl")
    back = srum_prompts.read_prompts(path)
    for row in back:
        target = row["target"]
        if row["category"] == "numeracy":
            n = len(target.placements)
            assert row["prompt"].split()[0 if not row["prompt"].startswith("a picture") else 3] == {2: "two", 3: "three", 4: "four"}[n]
            assert len({(p.subject.category, p.subject.colour) for p in target.placements}) == 1
        else:
            colours = [p.subject.colour for p in target.placements]
            assert len(colours) == len(set(colours))
            for p in target.placements:
                assert p.subject.colour in row["prompt"]
        if row["category"] == "spatial":
            a, b = target.placements
            if " on the left of " in row["prompt"]:
                assert a.bbox[0] < b.bbox[0]
            if " above " in row["prompt"]:
                assert a.bbox[1] < b.bbox[1]
        assert row["layout_specified"] == (row["category"] in ("spatial", "complex"))
