"""Understanding rows (data.understanding): every question type in both forms, answers that agree with the scene
graph (checked by an independent reader of the questions), a held-out set disjoint from training."""
import json
import re

import pytest

from data.build import build_dataset
from data.catalog import UND, UND_HELDOUT
from data.config import DataConfig, DatasetSizes
from data.formats import scone_s2i
from data.instructions import BACKGROUND_PHRASES, NUMBER_WORDS, PLURALS, TARGET_POSITION_PHRASES, describe
from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, TEXTURES
from data.understanding import CAPTION, QUESTION_TYPES, WORD_TYPES, answer_kind, understanding_cases
from data.world import HELD_OUT_COMBOS, TRAIN_COMBOS, slot_of

CATEGORIES = (*OBJECT_CATEGORIES, *CHARACTER_CATEGORIES)
PHRASE_SLOT = {}
for slot, phrase in TARGET_POSITION_PHRASES.items():
    PHRASE_SLOT.setdefault(phrase, []).append(slot)
SLOT_WORD = {"center": "middle"}  # the one-word answer to "where is it" for a lone subject


def cfg(**sizes) -> DataConfig:
    return DataConfig(seed=5, num_workers=1, sizes=DatasetSizes(**{"und_pretrain": 160, "und_heldout": 24, **sizes}))


@pytest.fixture(scope="module")
def train_cases():
    return understanding_cases(cfg(), UND)


@pytest.fixture(scope="module")
def heldout_cases():
    return understanding_cases(cfg(), UND_HELDOUT)


# ------------------------------------------------------------------ an independent reader of the questions


def _subjects(case):
    return [(p.subject, slot_of(case.target, i)) for i, p in enumerate(case.target.placements)]


def _referent(text: str):
    """'the striped red circle on the left' -> {"category", "colour", "texture", "position"} (position as the set
    of slots its phrase names)."""
    cues = {}
    for phrase, slots in PHRASE_SLOT.items():
        if text.endswith(" " + phrase):
            text, cues["position"] = text[: -len(phrase) - 1], set(slots)
            break
    words = text.split()
    assert words[0] == "the", text
    for w in words[1:]:
        if w in COLOURS:
            cues["colour"] = w
        elif w in TEXTURES:
            cues["texture"] = w
        elif w in CATEGORIES:
            cues["category"] = w
        else:
            assert w in ("one", "in"), text
    return cues


def _picked(case, cues):
    out = []
    for s, slot in _subjects(case):
        if all((slot in v) if k == "position" else getattr(s, k) == v for k, v in cues.items()):
            out.append((s, slot))
    return out


def _only(values):
    values = set(values)
    assert len(values) == 1, values  # the question is asked only when its answer is defined
    return values.pop()


def expected_answer(case, question: str) -> str:
    """The answer the scene graph gives, read from the question's words alone."""
    subjects = _subjects(case)
    if question == "describe the image":
        return case.instruction
    if question == "what place is this":
        return case.target.background
    if m := re.fullmatch(r"is this (.+)", question):
        return "yes" if BACKGROUND_PHRASES[case.target.background] == m[1] else "no"
    if m := re.fullmatch(r"is there an? (\w+)", question):
        word = m[1]
        key = "colour" if word in COLOURS else "category"
        return "yes" if any(getattr(s, key) == word for s, _ in subjects) else "no"
    if m := re.fullmatch(r"is there (an? .+)", question):  # the world's exact description
        return "yes" if any(describe(s) == m[1] for s, _ in subjects) else "no"
    if m := re.fullmatch(r"how many (.+) are there", question):
        return {0: "zero", **NUMBER_WORDS}[_count(subjects, m[1])]
    if m := re.fullmatch(r"are there (\w+) (.+)", question):
        claim = {v: k for k, v in NUMBER_WORDS.items()}[m[1]]
        return "yes" if _count(subjects, m[2]) == claim else "no"
    if m := re.fullmatch(r"what colour is (.+)", question):
        return _only(s.colour for s, _ in _picked(case, _referent(m[1])))
    if m := re.fullmatch(r"what pattern is (.+)", question):
        return _only(s.texture for s, _ in _picked(case, _referent(m[1])))
    if m := re.fullmatch(r"where is (.+)", question):
        return _only(SLOT_WORD.get(slot, slot) for _, slot in _picked(case, _referent(m[1])))
    if m := re.fullmatch(r"what is (.+)", question):
        return _only(s.category for s, _ in _picked(case, _referent(m[1])))
    if m := re.fullmatch(r"is (the .+) a (\w+)", question):
        return "yes" if _only(s.category for s, _ in _picked(case, _referent(m[1]))) == m[2] else "no"
    for phrase, slots in PHRASE_SLOT.items():
        if m := re.fullmatch(rf"is (the .+) {phrase}", question):
            return "yes" if _only(slot for _, slot in _picked(case, _referent(m[1]))) in slots else "no"
    if m := re.fullmatch(r"is (the .+) (\w+)", question):
        attribute = "colour" if m[2] in COLOURS else "texture"
        assert m[2] in COLOURS or m[2] in TEXTURES, question
        return "yes" if _only(getattr(s, attribute) for s, _ in _picked(case, _referent(m[1]))) == m[2] else "no"
    raise AssertionError(f"no template reads {question!r}")


def _count(subjects, noun: str) -> int:
    if noun == "things":
        return len(subjects)
    if m := re.fullmatch(r"(\w+) things", noun):
        return sum(s.colour == m[1] for s, _ in subjects)
    category = {v: k for k, v in PLURALS.items()}[noun]
    return sum(s.category == category for s, _ in subjects)


# ------------------------------------------------------------------ tests


def test_every_answer_agrees_with_the_scene_graph(train_cases, heldout_cases):
    n = 0
    for case in train_cases + heldout_cases:
        assert case.meta["slots"] == [slot_of(case.target, i) for i in range(len(case.target.placements))]
        for (question, answer), kind in zip(case.qa, case.meta["qa_types"], strict=True):
            assert expected_answer(case, question) == answer, (case.key, kind, question, answer)
            n += 1
    assert n > 1500


def test_every_question_type_in_both_forms_balanced(train_cases):
    counts = {}
    for case in train_cases:
        for (_, answer), kind in zip(case.qa, case.meta["qa_types"]):
            key = (kind, answer if answer in ("yes", "no") else answer_kind(kind, answer))
            counts[key] = counts.get(key, 0) + 1
    for kind in QUESTION_TYPES:
        assert counts[(kind, "yes")] == counts[(kind, "no")] > 20, kind  # one "yes" and one "no" per type asked
    for kind in WORD_TYPES:
        assert counts[(kind, "word")] > 10, kind
    assert ("presence", "word") not in counts and counts[(CAPTION, "caption")] > 10
    words = {a for c in train_cases for (_, a), k in zip(c.qa, c.meta["qa_types"]) if k not in (CAPTION,)}
    assert {"zero", "two", "middle", "top left", "striped", "robot", "red", "beach"} <= words


def test_heldout_asks_every_type_of_every_image_and_no_captions(heldout_cases):
    for case in heldout_cases:
        kinds = case.meta["qa_types"]
        assert CAPTION not in kinds
        assert {"presence", "colour", "shape", "texture", "scene"} <= set(kinds)
        for kind in set(kinds):
            answers = [a for (_, a), k in zip(case.qa, kinds) if k == kind]
            assert answers.count("yes") == answers.count("no") <= 1


def test_heldout_subjects_images_and_keys_are_disjoint_from_training(train_cases, heldout_cases):
    combo = lambda s: (s.category, s.colour, s.texture)  # noqa: E731
    train = {combo(p.subject) for c in train_cases for p in c.target.placements}
    held = {combo(p.subject) for c in heldout_cases for p in c.target.placements}
    assert train <= set(TRAIN_COMBOS) and held <= set(HELD_OUT_COMBOS) and not train & held
    assert not {c.key for c in train_cases} & {c.key for c in heldout_cases}
    assert not {c.target for c in train_cases} & {c.target for c in heldout_cases}


def test_rows_are_deterministic_and_build_as_one_image_understanding_rows(tmp_path):
    config = cfg(und_pretrain=40, und_heldout=8).model_copy(update={"root": str(tmp_path)})
    again = [c.to_row() for c in understanding_cases(config, UND)]
    assert again == [c.to_row() for c in understanding_cases(config, UND)]
    for name, n in ((UND, 40), (UND_HELDOUT, 8)):
        summary = build_dataset(name, config)
        assert summary["rows"] == n and summary["quarantined"] == 0 and summary["task_type"] == {"understanding": n}
        rows = list(scone_s2i.iter_rows(tmp_path, name))
        assert all(len(r["image"]) == 1 and r["instruction"] and json.loads(r["qa"]) for r in rows)

    from model.batching import examples_from_rows

    rows = list(scone_s2i.iter_rows(tmp_path, UND))
    examples = examples_from_rows(rows)
    assert all(e.understanding_only and e.refs == [] and e.target.shape == (32, 32, 3) for e in examples)
    assert [e.qa for e in examples] == [[tuple(p) for p in json.loads(r["qa"])] for r in rows]  # every question


def test_one_word_answers_are_single_tokens_of_a_tokenizer_trained_on_the_rows(tmp_path):
    """The chain's tokenizer reads every text the model reads (model.bagel.bootstrap): with the understanding rows
    among them, each one-word answer is a whole token, as "yes" and "no" are."""
    from model.bagel.bootstrap import judge_texts, train_tokenizer
    from model.bagel.release import load_tokenizer

    cases = understanding_cases(DataConfig(seed=1), UND)  # the default size: about 17,000 questions
    texts = [t for c in cases for q, a in c.qa for t in (c.instruction, q, a)] + judge_texts()
    tok, _ = load_tokenizer(train_tokenizer(texts, tmp_path / "tok", 512))
    answers = {a for c in cases for (_, a), k in zip(c.qa, c.meta["qa_types"]) if k != CAPTION}
    for answer in answers:
        ids = tok.encode(answer, add_special_tokens=False)
        assert len(ids) == len(answer.split()), (answer, [tok.decode([i]) for i in ids])
