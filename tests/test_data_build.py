"""Dataset builds: sizes, defects and refinement, multi-candidate derivation, determinism, held-out split."""
import hashlib
import json
from pathlib import Path

import pytest

from data.build import BASE, BENCH, DATASETS, MULTI, REFINED, SRUM, DataQualityError, build_all, build_dataset
from data.config import DataConfig, DatasetSizes, QualityConfig
from data.formats import scone_s2i, sconeeval, srum_prompts
from data.quality import SceneGraphJudge
from data.records import TASK_TYPES


def small_cfg(root: Path, seed: int = 1234, **kw) -> DataConfig:
    sizes = DatasetSizes(base=40, multi_candidate=24, bench_per_task=2, srum_prompts=14, t2i_pretrain=21)
    return DataConfig(seed=seed, root=str(root), rows_per_row_group=8, sizes=sizes, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = small_cfg(tmp_path_factory.mktemp("build") / "data")
    return cfg, build_all(cfg)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sizes_and_summaries(built):
    cfg, summary = built
    assert set(summary) == set(DATASETS)
    assert summary[BASE]["rows"] == 40
    assert summary[BASE]["defects"] == {"missing_subject": 4, "none": 30, "wrong_colour": 3, "wrong_position": 3}
    assert set(summary[BASE]["task_type"]) == {"composition_single", "composition_multi"}
    assert summary[MULTI]["rows"] == 24 and set(summary[MULTI]["task_type"]) <= set(TASK_TYPES[2:])
    assert summary[BENCH]["task_type"] == {t: 2 for t in TASK_TYPES}
    assert summary[SRUM]["rows"] == 14
    for s in summary.values():
        assert s["quarantined"] == 0
        assert sum(s.get("task_type", s.get("category")).values()) == s["rows"]


def test_refined_keeps_exactly_the_clean_base_rows(built):
    cfg, summary = built
    base = scone_s2i.read_cases(cfg.root, BASE)
    refined = scone_s2i.read_cases(cfg.root, REFINED)
    clean = [c.key for c in base if c.meta["defect"] is None]
    assert [c.key for c in refined] == clean
    assert all(c.meta["judge_score"] == 4 for c in refined)
    spoilt = [c for c in base if c.meta["defect"]]
    assert all(SceneGraphJudge().score(c)[0] < 4 for c in spoilt)


def test_refined_threshold_is_configuration(tmp_path):
    cfg = small_cfg(tmp_path, quality=QualityConfig(refined_keep_score=3))
    assert build_dataset(REFINED, cfg)["rows"] == 40  # every defect costs one point only


def test_multi_candidate_rows_add_candidates_around_an_unchanged_target(built):
    cfg, _ = built
    for case in scone_s2i.read_cases(cfg.root, MULTI):
        assert case.meta["candidates"] in ("cross", "intra") and case.task_type.endswith(case.meta["candidates"])
        wanted = {r.placements[lab.index(1)].subject.uid for r, lab in zip(case.references, case.subject_label) if lab}
        assert {p.subject.uid for p in case.target.placements} == wanted
        assert all(len(r.placements) >= 2 for r in case.references if r.placements)


def test_same_seed_gives_byte_identical_outputs(built, tmp_path):
    cfg, _ = built
    again = small_cfg(tmp_path / "data")
    build_all(again)
    assert digest(Path(again.root)) == digest(Path(cfg.root))
    other = small_cfg(tmp_path / "other", seed=99)
    build_dataset(BASE, other)
    a = Path(cfg.root) / "parquet_data" / BASE / "part-00000.parquet"
    b = Path(other.root) / "parquet_data" / BASE / "part-00000.parquet"
    assert a.read_bytes() != b.read_bytes()


def test_benchmark_shares_no_subject_and_no_combination_with_training(built):
    cfg, _ = built

    def subjects(cases):
        return [p.subject for c in cases for s in (*c.references, c.target) for p in s.placements]

    train = subjects(scone_s2i.read_cases(cfg.root, BASE) + scone_s2i.read_cases(cfg.root, MULTI))
    bench = subjects(sconeeval.read_bench(Path(cfg.root) / BENCH))
    srum = [p.subject for r in srum_prompts.read_prompts(Path(cfg.root) / SRUM / "prompts.jsonl") for p in r["target"].placements]
    combo = lambda s: (s.category, s.colour, s.texture)  # noqa: E731
    assert bench and train
    assert not {s.uid for s in bench} & {s.uid for s in train + srum}
    assert not {combo(s) for s in bench} & {combo(s) for s in train + srum}


def test_too_many_quarantined_rows_stop_the_build(tmp_path, monkeypatch):
    import data.build as build

    monkeypatch.setattr(build, "check_case", lambda case: ["candidate hidden"] if case.key.endswith(("1", "2")) else [])
    cfg = small_cfg(tmp_path)
    with pytest.raises(DataQualityError, match=r"8 of 40 rows quarantined .*max_quarantine_fraction=0.05"):
        build_dataset(BASE, cfg)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "quarantine" / f"{BASE}.parquet").to_pylist()
    assert len(rows) == 8 and rows[0]["reason"] == "candidate hidden"
    assert all(r["key"].endswith(("1", "2")) and len(r["image"]) >= 2 for r in rows)


def test_unknown_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        build_dataset("nope", small_cfg(tmp_path))


def test_t2i_rows_have_no_references_and_cover_every_category(built):
    from data.build import T2I
    from data.formats.srum_prompts import CATEGORIES

    cfg, summary = built
    assert summary[T2I]["rows"] == 21 and summary[T2I]["task_type"] == {"text_to_image": 21}
    assert summary[T2I]["case_type"] == {c: 3 for c in CATEGORIES}
    rows = list(scone_s2i.iter_rows(cfg.root, T2I))
    assert all(len(r["image"]) == 1 for r in rows)  # the target only
    cases = scone_s2i.read_cases(cfg.root, T2I)
    assert all(c.references == [] and c.target.placements for c in cases)
    answers = [a for c in cases for _, a in c.qa]
    assert answers.count("yes") == answers.count("no") > 0  # the understanding loss gets balanced questions
    # its own stream: none of its prompts is a SRUM round's prompt row
    srum_texts = {r["prompt"] for r in srum_prompts.read_prompts(Path(cfg.root) / SRUM / "prompts.jsonl")}
    assert sum(c.instruction in srum_texts for c in cases) < len(cases) // 2
    assert all(c.key.startswith("t2i_") for c in cases)
