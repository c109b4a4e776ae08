"""Two-step instruction construction: minimal unique phrases, template writing, closed vocabulary."""
import numpy as np
import pytest

from data.build import bench_cases, base_cases, multi_candidate_cases
from data.config import DataConfig, DatasetSizes
from data.formats.srum_prompts import make_prompts
from data.instructions import (
    MAX_INSTRUCTION_WORDS,
    VOCABULARY,
    InstructionPlan,
    Mention,
    TemplateWriter,
    counted,
    cues_match,
    describe,
    fit_style,
    get_writer,
    referring_phrase,
    unique_cues,
)
from data.scene import Subject
from data.world import World


def S(uid, category="circle", colour="red", texture="plain", size="large"):
    domain = "character" if category in ("person", "robot") else "object"
    return Subject(uid, domain, category, colour, texture, size)


def rng(seed=0):
    return np.random.default_rng(seed)


def test_phrases_read_naturally():
    assert referring_phrase({"category": "circle"}, "object") == "the circle"
    assert referring_phrase({"category": "circle", "colour": "red", "size": "small"}, "object") == "the small red circle"
    assert referring_phrase({"category": "person", "colour": "red", "position": "left"}, "character") == "the left person in red"
    assert describe(S("a", texture="striped")) == "a striped red circle"
    assert describe(S("a", colour="orange")) == "an orange circle"
    assert describe(S("a", "robot", "blue", "dotted"), "the") == "the robot in dotted blue"
    assert counted(S("a", colour="green", texture="dotted"), 3) == "three dotted green circles"
    assert counted(S("a", "person", "blue"), 2) == "two people in blue"


def test_lone_and_cross_category_candidates_are_named_by_category():
    assert unique_cues([(S("a"), "center")], 0, rng()) == {"category": "circle"}
    pair = [(S("a"), "left"), (S("b", "square", "blue"), "right")]
    assert unique_cues(pair, 1, rng()) == {"category": "square"}


def test_intra_category_uses_one_cue_only_when_one_suffices():
    # a and b differ in colour, texture and position but share the size: size alone can never work
    pair = [(S("a", colour="red", texture="striped"), "left"), (S("b", colour="blue"), "right")]
    seen = set()
    for seed in range(40):
        cues = unique_cues(pair, 0, rng(seed))
        assert len(cues) == 2 and "size" not in cues
        assert sum(cues_match(cues, s, p) for s, p in pair) == 1
        seen.add(next(k for k in cues if k != "category"))
    assert seen == {"colour", "texture", "position"}  # the choice among equally short phrases varies


def test_cues_that_are_shared_are_never_chosen():
    trio = [
        (S("a", colour="red", texture="striped", size="small"), "left"),
        (S("b", colour="blue", texture="striped", size="large"), "middle"),
        (S("c", colour="green", texture="plain", size="small"), "right"),
    ]
    # a shares its texture with b and its size with c: colour or position single it out
    for seed in range(20):
        cues = unique_cues(trio, 0, rng(seed))
        assert len(cues) == 2 and ("colour" in cues or "position" in cues)
    same = [(S("a"), "left"), (S("b"), "right")]  # identical attributes: only position tells them apart
    assert unique_cues(same, 1, rng()) == {"category": "circle", "position": "right"}


def test_writer_builds_the_instruction_from_the_plan_alone():
    plan = InstructionPlan(
        mentions=(
            Mention(1, "object", {"category": "circle", "colour": "red"}, "left"),
            Mention(2, "character", {"category": "person", "position": "right"}, "right"),
        ),
        layout="pair",
        background="beach",
        scene_image=None,
        style=0,  # verb 'place', link 'from image k', first template
    )
    text = TemplateWriter().write(plan)
    assert text == "place the red circle from image 1 on the left and the right person from image 2 on the right at the beach"
    with_scene = InstructionPlan(plan.mentions[:1], "single", "snow", scene_image=2, style=1 + 4 * 1 + 12 * 2)
    assert TemplateWriter().write(with_scene) == "create a picture of the red circle in image 1 in the scene from image 2"
    # rewriting with new cues keeps the wording (multi-candidate rows reuse the original instruction)
    again = TemplateWriter().write(plan.with_cues(1, {"category": "circle", "position": "left"}))
    assert again == text.replace("the red circle", "the left circle")


def test_unknown_writer_is_a_clear_error():
    with pytest.raises(ValueError, match="instruction_writer=template"):
        get_writer("openai")


def test_vocabulary_covers_every_generated_word():
    cfg = DataConfig(seed=3, sizes=DatasetSizes(base=60, multi_candidate=60, bench_per_task=10, srum_prompts=70))
    vocab = set(VOCABULARY)
    assert VOCABULARY == sorted(vocab)
    texts = []
    for case in base_cases(cfg) + multi_candidate_cases(cfg) + bench_cases(cfg):
        assert len(case.instruction.split()) <= MAX_INSTRUCTION_WORDS  # fits the model's text window
        texts.append(case.instruction)
        texts += [p for ps in case.subject_list for p in ps]
        texts += [q for q, _ in case.qa] + [a for _, a in case.qa]
    w = World(3, "srum", split="train", image_size=32, writer=TemplateWriter())
    texts += [r["prompt"] for r in make_prompts(w, 70)]
    used = {word for t in texts for word in t.split()}
    assert used <= vocab, sorted(used - vocab)
    assert all(t == t.lower() and "  " not in t and t == t.strip() for t in texts)
    # the vocabulary is small and mostly used
    assert len(vocab) < 100 and len(used) > 0.8 * len(vocab)


def test_long_instructions_switch_to_a_shorter_wording_with_the_same_phrases():
    corners = ("top left", "top right", "bottom left", "bottom right")
    mentions = tuple(Mention(i + 1, "object", {"category": "circle"}, slot) for i, slot in enumerate(corners))
    # 'create a picture of' + 4 x 'the circle from image k at the top left' + 3 joiners + 'at the beach' = 46 words
    plan = InstructionPlan(mentions, "grid", "beach", None, style=4 * 3 * 2)
    writer = TemplateWriter()
    assert len(writer.write(plan).split()) > MAX_INSTRUCTION_WORDS
    fitted = fit_style(plan, writer)
    text = writer.write(fitted)
    assert len(text.split()) <= MAX_INSTRUCTION_WORDS
    assert all(m.phrase in text for m in mentions) and fitted.mentions == plan.mentions
