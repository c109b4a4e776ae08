"""SRUM's reward protocol over the judge family: the global layout judgment and the regional judgments of a
generated image (SRUM Sec. 3.1-3.2, Appendix D), from the same three backends that score SconeEval.

- region proposals: colour blobs of the generated image (evaluation.detect), kept only when relevant to the
  prompt, i.e. of a colour the prompt names (every subject of the subject world is named with its colour);
  at most `max_regions` per image, largest first (the paper caps at 10).
- judgments, all scores in [-1, 1] with a reason:
  - global layout: how the arrangement follows the prompt's spatial intent. Guide bands: 1.0 perfect,
    0.5..0.9 mostly right, -0.9..-0.5 wrong, -1.0 contradicting. A prompt that states no layout
    (`layout_specified` false) is scored inside the neutral band -0.4..0.4 only, so a plausible layout
    the prompt did not ask for is never punished.
  - per region: relevance and visual quality together. 0.5..1.0 for a prompt subject rendered right
    (1.0 only when flawless), -0.4..0.4 for harmless fragments, -0.9..-0.5 for severe flaws: a prompt
    subject with the wrong shape or texture, or an unrequested extra copy of one.

Backends (`srum.judge`), the SconeEval judges' own: `oracle` reads the pixels against the prompt's ground-truth
scene with the oracle judge's detection, matching and thresholds (evaluation.detect: PRESENCE_FRACTION, the
silhouette ramp); `self` asks the model's understanding expert through the pipeline's `yes_probability`, as the
self judge does (score = 2 P(yes) - 1); `openai` sends JSON-answer requests through the `openai` judge
(evaluation.judges.openai.OpenAIJudge: the one client's cache, retries, concurrency and usage), with prompts
after the paper's two scoring guides (our wording). evaluation.srum turns the judgments into reward records.
The three backends of the protocol stay side by side in this one module (about 430 lines): each reads best next
to the bands the others implement.

Over 400 lines on purpose: the three SRUM reward judges share region proposals and prompts; kept beside each other
so their reward scales stay comparable.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from data.formats.srum_rewards import GLOBAL_OBJECT
from data.instructions import qa_position, qa_there
from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, TEXTURES, Scene
from data.world import slot_of
from evaluation.detect import (
    PRESENCE_FRACTION,
    SHAPE_IOU_FULL,
    SHAPE_IOU_ZERO,
    Detection,
    aligned_mask_iou,
    detect,
    ground_truth_blobs,
    match_one_to_one,
    ramp,
    resize_to,
    texture_similarity,
    to_array,
    variant_blob,
)
from evaluation.t2i import canonical_category, row_target

MAX_REGIONS = 10  # the paper's regional reward runs use at most 10 regions per image
NEUTRAL_BAND = 0.4
ALL_CATEGORIES = OBJECT_CATEGORIES + CHARACTER_CATEGORIES


@dataclass(frozen=True)
class Region:
    """A region proposal: a blob of a colour the prompt names."""

    colour: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in pixels of the judged image
    detection: Detection


@dataclass(frozen=True)
class Judgment:
    score: float  # [-1, 1]
    reason: str
    object: str = ""  # what the judge identified (regional judgments)


class RewardJudge(Protocol):
    name: str

    def judge(self, row: Any, image: np.ndarray, regions: Sequence[Region]) -> tuple[Judgment, list[Judgment]]:
        """(global layout judgment, one judgment per region) for a generated image of prompt `row`."""
        ...


# ---------------------------------------------------------------------------------------------- helpers


def row_field(row, name: str, default=None):
    """A field of a prompt row (a dict or an object)."""
    return row.get(name, default) if isinstance(row, dict) else getattr(row, name, default)


def prompt_text(row) -> str:
    return str(row_field(row, "prompt", ""))


def layout_specified(row) -> bool:
    """Does the prompt state where things go? Rows say so; older rows fall back to their category."""
    value = row_field(row, "layout_specified")
    if value is not None:
        return bool(value)
    return canonical_category(row_field(row, "category")) in ("spatial", "complex")


def prompt_colours(row) -> list[str]:
    """Subject colours the prompt names, in palette order (the target scene's colours if the text names none)."""
    words = set(re.findall(r"[a-z]+", prompt_text(row).lower()))
    named = [c for c in COLOURS if c in words]
    if named:
        return named
    target = row_target(row)
    return [c for c in COLOURS if any(p.subject.colour == c for p in target.placements)]


def clamp_score(score: float) -> float:
    return float(min(1.0, max(-1.0, score)))


def layout_band(fraction: float, exact_counts: bool = True) -> float:
    """Global score for a stated layout from the share of its relations the image keeps (guide bands)."""
    if fraction >= 1.0:
        return 1.0 if exact_counts else 0.9
    if fraction >= 0.5:
        return 0.5 + 0.8 * (fraction - 0.5)  # 0.5 .. <0.9: mostly correct
    if fraction > 0.0:
        return -0.9 + 0.8 * fraction  # -0.9 .. <-0.5: incorrect
    return -1.0  # nothing as asked: contradicts the prompt


def neutral_band(quality: float) -> float:
    """Global score for a prompt without layout intent: quality in [0, 1] -> [-0.4, 0.4]."""
    return NEUTRAL_BAND * (2.0 * float(np.clip(quality, 0.0, 1.0)) - 1.0)


def propose_regions(image, row, *, max_regions: int = MAX_REGIONS) -> list[Region]:
    """Blobs of the prompt's colours in `image` (uint8 H x W x 3), largest first, at most max_regions."""
    colours = prompt_colours(row)
    found = detect(to_array(image), colours=colours) if colours else []
    return [Region(d.colour, d.bbox, d) for d in found[:max_regions]]


def isolate(image: np.ndarray, bbox: tuple[int, int, int, int]) -> np.ndarray:
    """The image with everything outside bbox (1 px margin) painted over with the background.

    The background of a row is the median of its pixels outside every detected subject (the image's
    whole background median for rows without any), so sky and ground stay where they were and a
    whole-image yes/no question is about the region alone."""
    arr = to_array(image).copy()
    h, w = arr.shape[:2]
    x0, y0, x1, y1 = max(0, bbox[0] - 1), max(0, bbox[1] - 1), min(w, bbox[2] + 1), min(h, bbox[3] + 1)
    outside = np.ones((h, w), dtype=bool)
    outside[y0:y1, x0:x1] = False
    subjects = np.zeros((h, w), dtype=bool)
    for d in detect(arr):
        subjects |= d.mask
    background = ~subjects
    overall = np.median(arr[background], axis=0) if background.any() else np.median(arr.reshape(-1, 3), axis=0)
    for y in range(h):
        row_bg = arr[y][background[y]]
        arr[y][outside[y]] = (np.median(row_bg, axis=0) if len(row_bg) else overall).astype(np.uint8)
    return arr


# ---------------------------------------------------------------------------------------------- oracle


def _match(gt: Sequence[tuple[Detection, int]], regions: Sequence[Region]) -> dict[int, int]:
    """Region index -> ground-truth index (evaluation.detect.match_one_to_one)."""
    return match_one_to_one([g for g, _ in gt], [r.detection for r in regions])


class OracleRewardJudge:
    """Judgments from the prompt's exact ground-truth scene (see the module docstring for the bands)."""

    name = "oracle"

    def judge(self, row, image, regions: Sequence[Region]) -> tuple[Judgment, list[Judgment]]:
        target = row_target(row)
        arr = resize_to(to_array(image), target.size)
        scene_json = target.to_json()
        gt = ground_truth_blobs(scene_json)
        matched = _match(gt, regions)
        region_judgments = [self._region(scene_json, target, gt, matched.get(i), r) for i, r in enumerate(regions)]
        return self._global(row, target, gt, arr), region_judgments

    # -- regions

    def _region(self, scene_json: str, target: Scene, gt, gi: int | None, region: Region) -> Judgment:
        d = region.detection
        if gi is None:
            same = [g.area for g, _ in gt if g.colour == region.colour]
            expected = float(np.median(same)) if same else float(d.area)
            if d.area >= PRESENCE_FRACTION * expected:
                share = min(1.0, d.area / expected)
                return Judgment(-0.5 - 0.4 * share, f"an extra {region.colour} subject ({d.area} px) the prompt does "
                                f"not ask for: distracting, contradicts the prompt's count", f"extra {region.colour} blob")
            share = d.area / (PRESENCE_FRACTION * expected)
            return Judgment(-NEUTRAL_BAND * share, f"a small {region.colour} fragment ({d.area} px of an expected "
                            f"{expected:.0f}): harmless but not a subject", f"{region.colour} fragment")
        g, pi = gt[gi]
        subject = target.placements[pi].subject
        shapes = {c: aligned_mask_iou(d, v) if (v := variant_blob(scene_json, pi, c, subject.texture)) else 0.0
                  for c in ALL_CATEGORIES}
        textures = {t: texture_similarity(d, v) if (v := variant_blob(scene_json, pi, subject.category, t)) else 0.0
                    for t in TEXTURES}
        # ties count as right: a person's body-colour blob is a box, as a square's is
        shape_ok = shapes[subject.category] >= max(shapes.values()) - 1e-9
        texture_ok = textures[subject.texture] >= max(textures.values()) - 1e-9
        shape_q = float(ramp(1.0 - shapes[subject.category], 1.0 - SHAPE_IOU_FULL, 1.0 - SHAPE_IOU_ZERO))
        size_q = min(d.area, g.area) / max(d.area, g.area)
        quality = (shape_q + textures[subject.texture] + size_q) / 3.0
        looks = f"shape {shape_q:.2f}, texture {textures[subject.texture]:.2f}, size {size_q:.2f}"
        if shape_ok and texture_ok:
            return Judgment(0.5 + 0.5 * quality, f"the {subject.name} the prompt asks for; {looks}", subject.name)
        flaws = []
        if not shape_ok:
            flaws.append(f"looks like a {max(shapes, key=shapes.get)}")
        if not texture_ok:
            flaws.append(f"its texture reads as {max(textures, key=textures.get)}")
        return Judgment(-0.9 + 0.4 * quality, f"meant to be the {subject.name} but {' and '.join(flaws)}: "
                        f"severe flaw; {looks}", subject.name)

    # -- global layout

    def _global(self, row, target: Scene, gt, arr: np.ndarray) -> Judgment:
        gen = detect(arr, colours=sorted({g.colour for g, _ in gt}))
        regions = [Region(d.colour, d.bbox, d) for d in gen]
        matched = {gi: regions[ri].detection for ri, gi in _match(gt, regions).items()}
        found = len(matched) / len(gt) if gt else 1.0
        counts_ok = []
        for colour in sorted({g.colour for g, _ in gt}):
            areas = [g.area for g, _ in gt if g.colour == colour]
            n = sum(d.area >= PRESENCE_FRACTION * float(np.median(areas)) for d in gen if d.colour == colour)
            counts_ok.append(n == len(areas))
        exact = all(counts_ok)
        names = [target.placements[pi].subject.name for _, pi in gt]
        summary = f"{len(matched)}/{len(gt)} subjects found, counts {'right' if exact else 'wrong'}"
        if layout_specified(row):
            relations = []
            for a in range(len(gt)):
                for b in range(a + 1, len(gt)):
                    (ga, _), (gb, _) = gt[a], gt[b]
                    delta = np.subtract(gb.centroid, ga.centroid)
                    axis = int(abs(delta[1]) > abs(delta[0]))
                    if abs(delta[axis]) <= 2.0:  # no relation the eye could state
                        continue
                    ok = a in matched and b in matched and bool(
                        np.sign(matched[b].centroid[axis] - matched[a].centroid[axis]) == np.sign(delta[axis]))
                    relations.append((names[a], names[b], "xy"[axis], ok))
            if relations:
                f = float(np.mean([ok for *_, ok in relations]))
                kept = ", ".join(f"{a} {'before' if ok else 'NOT before'} {b} along {ax}" for a, b, ax, ok in relations)
                return Judgment(layout_band(f, exact), f"stated layout: {f:.0%} of the relations hold ({kept}); {summary}",
                                GLOBAL_OBJECT)
        quality = (found + (float(np.mean(counts_ok)) if counts_ok else 1.0)) / 2.0
        return Judgment(neutral_band(quality), f"no layout stated: neutral band; {summary}", GLOBAL_OBJECT)


# ---------------------------------------------------------------------------------------------- self


class SelfRewardJudge:
    """The model's own understanding expert answers yes/no questions; score = 2 P(yes) - 1.

    Questions use the templates the model was trained on (data.instructions): "is there <subject>" for a
    region (asked on the image with everything outside the region blanked, `isolate`), and for a stated
    layout "is <subject> <position>" with the position the prompt states for it. Without a stated layout
    the global score is the mean presence answer, squeezed into the neutral band.
    """

    name = "self"

    def __init__(self, pipeline):
        self.pipeline = pipeline  # anything with yes_probability(images, questions), e.g. model.pipeline's

    def _ask(self, images: list[np.ndarray], questions: list[str]) -> np.ndarray:
        return np.asarray(self.pipeline.yes_probability(images, questions)) if questions else np.zeros(0)

    def judge(self, row, image, regions: Sequence[Region]) -> tuple[Judgment, list[Judgment]]:
        target = row_target(row)  # what the prompt names and where it says things go, never the pixels
        arr = to_array(image)
        by_colour = {}
        for p in target.placements:
            by_colour.setdefault(p.subject.colour, p.subject)
        images, questions = [], []
        for r in regions:
            images.append(isolate(arr, r.bbox))
            questions.append(qa_there(by_colour[r.colour]) if r.colour in by_colour else f"is there a {r.colour}")
        stated = layout_specified(row)
        global_q: list[str] = []
        if stated:
            try:
                global_q = [qa_position(p.subject, slot_of(target, i)) for i, p in enumerate(target.placements)]
            except ValueError:  # the target is not on the world's slots: no position to ask about
                stated = False
        if not stated:
            global_q = [qa_there(s) for s in by_colour.values()]
        p = self._ask(images + [arr] * len(global_q), questions + global_q)
        p_regions, p_global = p[: len(regions)], p[len(regions):]
        region_judgments = []
        for r, q, pr in zip(regions, questions, p_regions):
            what = by_colour[r.colour].name if r.colour in by_colour else f"{r.colour} blob"
            reason = f"asked {q!r} on the region: P(yes) = {pr:.2f}"
            region_judgments.append(Judgment(clamp_score(2 * float(pr) - 1), reason, what))
        mean_p = float(np.mean(p_global)) if len(p_global) else 0.5
        asked = "; ".join(f"{q!r}: {v:.2f}" for q, v in zip(global_q, p_global))
        if stated:
            g = Judgment(clamp_score(2 * mean_p - 1), f"stated layout, mean P(yes) {mean_p:.2f} ({asked})", GLOBAL_OBJECT)
        else:
            g = Judgment(neutral_band(mean_p), f"no layout stated: neutral band, mean P(yes) {mean_p:.2f} ({asked})",
                         GLOBAL_OBJECT)
        return g, region_judgments


# ---------------------------------------------------------------------------------------------- openai


class LayoutAnswer(BaseModel):
    """The global judgment: one score in [-1, 1] and why."""

    model_config = ConfigDict(extra="ignore")
    reason: str
    score: Annotated[StrictFloat, Field(ge=-1, le=1, allow_inf_nan=False)]


class RegionAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    region: StrictInt
    object: str
    reason: str
    score: Annotated[StrictFloat, Field(ge=-1, le=1, allow_inf_nan=False)]


class RegionsAnswer(BaseModel):
    """The regional judgments: one entry per numbered region."""

    model_config = ConfigDict(extra="ignore")
    regions: list[RegionAnswer]


def global_layout_prompt(prompt: str, layout_stated: bool) -> str:
    """The global judgment request, after the paper's layout scoring guide (our wording)."""
    intent = ("The prompt states where things go: judge the arrangement against it."
              if layout_stated else
              "The prompt states no placement: any sensible arrangement is neutral, so stay within -0.4 to 0.4.")
    return (
        "You judge the composition of a generated image against the prompt it was made from. Look only at how "
        "the elements are arranged and whether that matches where the prompt says things should be.\n"
        f'Prompt: "{prompt}"\n{intent}\n'
        "Give one score, a number from -1 to 1:\n"
        "  1.0: the arrangement is exactly what the prompt asks for;\n"
        "  0.5 to 0.9: the layout is mostly right, with small mistakes;\n"
        "  -0.4 to 0.4: neutral, the prompt says nothing about placement or the layout is generic;\n"
        "  -0.9 to -0.5: the layout is wrong or goes against the prompt;\n"
        "  -1.0: the arrangement is the opposite of what the prompt asks.\n"
        'Answer with JSON only: {"reason": "<why, one sentence>", "score": <number>}'
    )


def region_prompt(prompt: str, regions: Sequence[Region]) -> str:
    """The regional judgment request, after the paper's region scoring guide (our wording)."""
    listed = "\n".join(f"Region {i + 1}: box {list(r.bbox)} (x0, y0, x1, y1 in pixels)" for i, r in enumerate(regions))
    return (
        "You analyse boxed regions of a generated image made from a prompt.\n"
        f'Prompt: "{prompt}"\n{listed}\n'
        "For every region, first name the main object inside it, then give one strict score, a number from -1 to 1, "
        "that weighs both how relevant the object is to the prompt and how well it is drawn:\n"
        "  1.0: exactly what the prompt asks for and without any flaw;\n"
        "  0.5 to 0.9: a relevant object with small flaws, or a well drawn secondary element;\n"
        "  -0.4 to 0.4: neutral: somewhat relevant, mixed quality, or a harmless background element (0 is neutral);\n"
        "  -0.9 to -0.5: irrelevant and distracting, or a relevant object with severe artifacts or distortion;\n"
        "  -1.0: it works against the prompt.\n"
        'Answer with JSON only: {"regions": [{"region": <number>, "object": "<what it is>", '
        '"reason": "<why>", "score": <number>}, ...]} with one entry per region.'
    )


def regions_from_answer(answer: RegionsAnswer, n: int, key: str) -> list[Judgment]:
    """One judgment per region; a region the answer skipped is neutral (0) with a warning, never fatal."""
    found = {a.region - 1: Judgment(a.score, a.reason, a.object) for a in answer.regions if 1 <= a.region <= n}
    missing = [i + 1 for i in range(n) if i not in found]
    if missing:
        warnings.warn(f"SRUM judge: prompt {key}: no judgment for region(s) {missing}; they count as neutral 0",
                      stacklevel=2)
    return [found.get(i, Judgment(0.0, "the judge gave no score for this region: neutral")) for i in range(n)]


class OpenAIRewardJudge:
    """A VLM behind an OpenAI-compatible endpoint, through evaluation.judges.openai.OpenAIJudge (bounded
    concurrency, retries with backoff, strict JSON parsing with re-asking, on-disk cache, token accounting).
    The global and the regional request of an image go out together."""

    name = "openai"

    def __init__(self, client):
        self.client = client

    def judge(self, row, image, regions: Sequence[Region]) -> tuple[Judgment, list[Judgment]]:
        from evaluation.judges.openai import chat_messages, json_request

        arr = to_array(image)
        prompt, key = prompt_text(row), str(row_field(row, "key", "?"))
        shown = [("Generated image:", self.client.image_url(arr))]
        requests = [json_request(key, "srum_layout", "global layout",
                                 chat_messages(global_layout_prompt(prompt, layout_specified(row)), shown), LayoutAnswer)]
        if regions:
            requests.append(json_request(key, "srum_regions", f"{len(regions)} regions",
                                         chat_messages(region_prompt(prompt, regions), shown), RegionsAnswer))
        answers = self.client.ask(requests)
        layout = answers[0]
        score = layout.score
        if not layout_specified(row):  # the guide's neutral band, whatever the endpoint said
            score = float(np.clip(score, -NEUTRAL_BAND, NEUTRAL_BAND))
        g = Judgment(score, layout.reason, GLOBAL_OBJECT)
        return g, (regions_from_answer(answers[1], len(regions), key) if regions else [])


def make_reward_judge(kind: str, *, pipeline=None, openai_cfg=None, judge=None) -> RewardJudge:
    """The SRUM judge of `srum.judge`; `openai` takes the endpoint settings of `eval.openai` (OpenAIJudgeConfig),
    or an `OpenAIJudge` already built (`judge=`: its client, cache and usage are shared with its SconeEval work).

    `self` asks `pipeline` (model.pipeline.load_pipeline of the round's checkpoint)."""
    if kind == "oracle":
        return OracleRewardJudge()
    if kind == "self":
        if pipeline is None:
            raise ValueError("the 'self' SRUM judge needs the round's pipeline (model.pipeline.load_pipeline): its "
                             "understanding expert answers")
        return SelfRewardJudge(pipeline)
    if kind == "openai":
        from evaluation.judges.openai import OpenAIJudge

        return OpenAIRewardJudge(judge if judge is not None else OpenAIJudge(openai_cfg))
    raise ValueError(f"unknown SRUM judge {kind!r}; expected oracle, self or openai (srum.judge in params.yaml)")


