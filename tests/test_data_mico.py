"""MICo-150K coverage: 7 sub-tasks, 27 composition types and De&Re; Compose-by-Retrieval picks the best companion."""
from collections import Counter

import pytest

from data.build import MICO, build_dataset
from data.config import DataConfig, DatasetSizes
from data.formats import scone_s2i
from data.mico import (
    COMPOSITION_TYPES,
    DE_RE,
    ENTITY_POOLS,
    SUB_TASK_OF,
    compatibility,
    parse_type,
    scene_compatibility,
    skipped_types,
)
from data.quality import SceneGraphJudge, check_case
from data.records import MICO_TASK_TYPES
from data.scene import Scene, Subject
from data.validate import validate_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = DataConfig(root=str(tmp_path_factory.mktemp("mico") / "data"), rows_per_row_group=16,
                     num_workers=1, sizes=DatasetSizes(mico=56))
    return cfg, build_dataset(MICO, cfg), scone_s2i.read_cases(cfg.root, MICO)


def test_table_1_taxonomy():
    assert len(COMPOSITION_TYPES) == 27 and len(set(SUB_TASK_OF.values())) == 8  # 7 sub-tasks + De&Re
    assert set(SUB_TASK_OF.values()) == set(MICO_TASK_TYPES)
    assert parse_type("1P2C2O") == ["P", "C", "C", "O", "O"] and parse_type("2W1M") == ["W", "W", "M"]
    with pytest.raises(ValueError, match="not a MICo composition type"):
        parse_type("1X")
    assert skipped_types(DataConfig()) == []  # the default builds all 27 types, the five-input ones included
    assert skipped_types(DataConfig(mico_max_references=4)) == ["5O", "1P4C", "1P2C2O"]


def test_every_type_is_built_valid_and_judged_perfect(built):
    cfg, summary, cases = built
    assert set(summary["case_type"]) == {*COMPOSITION_TYPES, DE_RE} and summary["skipped_types"] == []
    assert summary["quarantined"] == 0 and summary["rows"] == 56
    assert validate_dataset(MICO, cfg)["success"]
    judge = SceneGraphJudge()
    for c in cases:
        assert c.task_type == SUB_TASK_OF[c.case_type] and check_case(c) == []
        assert judge.score(c) == (4, [])
        if c.case_type != DE_RE:
            roles = parse_type(c.case_type)
            assert len(c.references) == len(roles)  # one input image per entity, scene last
            subjects = [r.placements[0].subject for r in c.references if r.placements]
            assert [s.category in ENTITY_POOLS[x] for s, x in zip(subjects, [x for x in roles if x != "S"])] == [True] * len(subjects)
        else:
            assert Scene.from_dict(c.meta["photo"]) == c.target and c.references[-1].placements == ()


def test_compose_by_retrieval_picks_the_most_compatible_candidate(built):
    _, _, cases = built
    records = [r for c in cases for r in c.meta["retrieval"]]
    assert {r["role"] for r in records} >= {"C", "O", "S"}
    for c in cases:
        subjects = {p.subject.uid for p in c.target.placements}
        for r in c.meta["retrieval"]:
            if r["role"] == "S":
                scene_subjects = [p.subject for p in c.target.placements]
                scores = [scene_compatibility(scene_subjects, s) for s in r["candidates"]]
                assert r["candidates"][r["picked"]] == c.target.background
            else:
                primary = Subject(**r["primary"])
                cands = [Subject(**x) for x in r["candidates"]]
                scores = [compatibility(primary, x, r["role"], r["context"]) for x in cands]
                assert cands[r["picked"]].uid in subjects
                assert not {x.uid for i, x in enumerate(cands) if i != r["picked"]} & subjects
            assert scores == pytest.approx(r["scores"]) and r["picked"] == scores.index(max(scores))
    # object + object and person + person draw at random, as MICo does
    assert all(not c.meta["retrieval"] for c in cases if c.task_type in ("object_object", "person_person"))


def test_compatibility_by_hand():
    man = Subject("p", "character", "person", "red", "plain", "large")
    hat_fit = Subject("a", "object", "triangle", "cyan", "plain", "large")
    hat_small = Subject("b", "object", "triangle", "cyan", "plain", "small")
    # co-occurrence 1.0, contrast |red - cyan| / max = |(180, -160, -170)| / 441.67, size fits
    contrast = (180**2 + 160**2 + 170**2) ** 0.5 / (3 * 255**2) ** 0.5
    assert compatibility(man, hat_fit, "C", []) == pytest.approx(0.4 + 0.3 * contrast + 0.3)
    assert compatibility(man, hat_small, "C", []) == pytest.approx(0.4 + 0.3 * contrast)
    assert compatibility(man, hat_small, "O", []) == pytest.approx(0.4 + 0.3 * contrast + 0.3)


def test_a_four_input_limit_skips_the_five_input_types(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "data"), num_workers=1, sizes=DatasetSizes(mico=25), mico_max_references=4)
    summary = build_dataset(MICO, cfg)
    assert Counter(summary["case_type"]).total() == 25 and len(summary["case_type"]) == 25
    assert summary["skipped_types"] == ["5O", "1P4C", "1P2C2O"]
