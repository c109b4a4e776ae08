"""MIGE subject addition / replacement: <imagehere> instructions, the source image as conditional input."""
import pytest

from data.build import MIGE, build_dataset
from data.config import DataConfig, DatasetSizes
from data.formats import scone_s2i
from data.instructions import IMAGE_PLACEHOLDER, VOCABULARY, edit_instruction
from data.quality import check_case
from data.validate import validate_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = DataConfig(root=str(tmp_path_factory.mktemp("mige") / "data"), num_workers=1, sizes=DatasetSizes(mige_edit=20))
    return cfg, build_dataset(MIGE, cfg), scone_s2i.read_cases(cfg.root, MIGE)


def test_instructions_follow_mige_templates():
    assert edit_instruction("addition", slot="left") == "add <imagehere> on the left of <imagehere>"
    assert edit_instruction("replacement", phrase="the red circle") == "replace the red circle in <imagehere> with <imagehere>"
    assert IMAGE_PLACEHOLDER in VOCABULARY and {"add", "replace", "with", "of"} <= set(VOCABULARY)
    # every word is in the closed vocabulary the chain's tokenizer is trained on (model.bagel.bootstrap): the
    # tokenizer has seen each of them (a byte-level BPE has no unknown token to check for instead)
    for text in (edit_instruction("addition", slot="left"), edit_instruction("replacement", phrase="the red circle")):
        assert set(text.split()) <= set(VOCABULARY), text


def test_rows_edit_the_source_in_place(built):
    cfg, summary, cases = built
    assert summary["task_type"] == {"subject_addition": 10, "subject_replacement": 10} and summary["quarantined"] == 0
    assert validate_dataset(MIGE, cfg)["success"]
    rows = list(scone_s2i.iter_rows(cfg.root, MIGE))
    for c, row in zip(cases, rows):
        assert check_case(c) == [] and c.instruction.count(IMAGE_PLACEHOLDER) == len(c.references) == 2
        assert len(row["image"]) == 3 and c.meta["conditional_input"] == "source_image"
        src = c.references[c.meta["source_image"]]
        (subject_ref,) = [r for i, r in enumerate(c.references) if i != c.meta["source_image"]]
        new = subject_ref.placements[0].subject
        target = {p.subject.uid: p.bbox for p in c.target.placements}
        if c.meta["edit_type"] == "addition":
            assert c.meta["source_image"] == 1 and c.instruction.startswith("add <imagehere>")
            # every source subject stays where it was; the new one joins
            assert all(target[p.subject.uid] == p.bbox for p in src.placements)
            assert set(target) == {p.subject.uid for p in src.placements} | {new.uid}
        else:
            assert c.meta["source_image"] == 0 and c.instruction.startswith("replace ")
            replaced = c.meta["replaced"]
            assert replaced not in target and new.uid in target
            assert all(target[p.subject.uid] == p.bbox for p in src.placements if p.subject.uid != replaced)
        assert c.subject_list[c.meta["source_image"]] == []  # the source is a canvas, not candidates


def test_same_seed_same_bytes(built, tmp_path):
    cfg, _, _ = built
    again = cfg.model_copy(update={"root": str(tmp_path / "data")})
    build_dataset(MIGE, again)
    a = sorted((p.name, p.read_bytes()) for p in (scone_s2i.data_dir(cfg.root, MIGE)).glob("*.parquet"))
    b = sorted((p.name, p.read_bytes()) for p in (scone_s2i.data_dir(again.root, MIGE)).glob("*.parquet"))
    assert a == b
