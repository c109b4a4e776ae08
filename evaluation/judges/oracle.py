"""The oracle judge: SconeEval scores from the generated pixels and the world's exact ground truth.

It looks only at the generated image, comparing it with what the case's ground truth renders to
(`data.render` of the target scene and of the references). Colours are unique within a case, so a
subject is identified by its body colour (evaluation.detect). Deterministic.

Rules (thresholds in `OracleThresholds`; pixel figures for a 32 x 32 image):

Required subjects are the target scene's placements whose colour is visible in the rendered target;
`A_gt` is a subject's area there. For each, its match is the union of the generated blobs of its
colour whose bbox overlaps the ground-truth bbox (the largest blob of the colour when none does).

PF, prompt following (0-10): composition. Following the SconeEval scoring guide, PF does not judge
the identity of subjects or of a scene taken from a reference image (those belong to SC); a scene
the instruction names in words is an instruction, so PF judges that one.
    per subject: 0.4 * presence + 0.6 * position
        presence = min(1, matched area / (0.5 * A_gt))           (partial credit for a faint blob)
        position = min(1, bbox IoU(match, ground truth) / 0.8)
    PF = 10 * mean over subjects * background factor * 1 / (1 + extras)
    background factor: 1, or 0.75 + 0.25 * background agreement (below) when the instruction names the
        scene in words ("in the city") and no reference image supplies it
    extras: every other blob weighs min(1, area / A_expected) when area >= PRESENCE_FRACTION (0.3) * A_expected,
        else 0:
        a second blob of a required colour (a duplicate, A_expected = that subject's A_gt), a
        distractor from a reference (A_expected = its area in that reference) or a colour no
        reference holds (a hallucination, A_expected = median A_gt).

SC, subject consistency (0-10): appearance of each required subject's match
    per subject: 10 * (0.3 colour + 0.3 shape + 0.2 texture + 0.2 size), 0 when nothing matched
        colour  = 1 at a mean-RGB distance <= 15 from the ground-truth blob, 0 at >= 75
        shape   = IoU of the silhouettes after scaling the match's bbox onto the ground truth's,
                  mapped to 1 at IoU >= 0.95 and 0 at IoU <= 0.45
        texture = detect.texture_similarity (texture-mark share and stripe structure)
        size    = min(area, A_gt) / max(area, A_gt)
    When the case has a scene reference (a reference image without subjects), the background counts
    as one more item: 10 * background agreement = 10 * mean over the ground-truth background pixels
    (1 px away from subjects) of a colour agreement that is 1 at distance <= 30 and 0 at >= 80.
    SC = mean over the items.

Presence(ref i, phrase): the candidate is `case.references[i].placements[j]`, j = the phrase's index
in `case.subject_list[i]` (phrases are in placement order). It is present (1) when the largest blob of
its colour covers >= PRESENCE_FRACTION (0.3, evaluation.detect) * A_expected (its A_gt when it is also in the
target, else its area in the reference render).

A perfect render of the target scores PF = SC = 10 and answers every presence question as
`subject_label`; an image without subject colours scores 0.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from data.render import own_mask, render_array
from data.scene import Scene
from evaluation.detect import (
    PRESENCE_FRACTION,
    SHAPE_IOU_FULL,
    SHAPE_IOU_ZERO,
    Detection,
    aligned_mask_iou,
    bbox_iou,
    by_colour,
    detect,
    merge,
    ramp,
    resize_to,
    texture_similarity,
    to_array,
)


@dataclass(frozen=True)
class OracleThresholds:
    full_dist: float = 30.0  # pixel classification: full palette membership within this RGB distance
    zero_dist: float = 80.0  # ... and none beyond this one
    presence_fraction: float = PRESENCE_FRACTION  # a blob counts as the subject at this share of its expected area
    soft_presence_fraction: float = 0.5  # PF's presence credit is full at this share
    position_iou_full: float = 0.8  # PF's position credit is full at this bbox IoU
    shape_iou_full: float = SHAPE_IOU_FULL  # SC shape credit: full at this aligned silhouette IoU ...
    shape_iou_zero: float = SHAPE_IOU_ZERO  # ... none at this one
    colour_full: float = 15.0
    colour_zero: float = 75.0
    background_full: float = 30.0
    background_zero: float = 80.0
    pf_presence_weight: float = 0.4
    pf_background_weight: float = 0.25  # share of PF at stake for a background the instruction names in words
    sc_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.2, 0.2)  # colour, shape, texture, size


@dataclass
class SubjectScore:
    name: str
    colour: str
    gt: Detection
    match: Detection | None
    presence: float = 0.0
    position: float = 0.0
    colour_score: float = 0.0
    shape: float = 0.0
    texture: float = 0.0
    size: float = 0.0

    def pf(self, t: OracleThresholds) -> float:
        return t.pf_presence_weight * self.presence + (1 - t.pf_presence_weight) * self.position

    def sc(self, t: OracleThresholds) -> float:
        if self.match is None:
            return 0.0
        wc, ws, wt, wz = t.sc_weights
        return 10 * (wc * self.colour_score + ws * self.shape + wt * self.texture + wz * self.size)


@dataclass
class Extra:
    colour: str
    area: int
    expected: float
    weight: float
    what: str  # "duplicate of ...", "distractor ... from image k", "hallucinated ..."


@dataclass
class CaseAnalysis:
    pf: float
    sc: float
    pf_reason: str
    sc_reason: str
    subjects: list[SubjectScore] = field(default_factory=list)
    extras: list[Extra] = field(default_factory=list)
    background: float | None = None


class OracleJudge:
    name = "oracle"
    deterministic = True

    def __init__(self, thresholds: OracleThresholds | None = None, cache_size: int = 512):
        self.t = thresholds or OracleThresholds()
        self._cache: dict[tuple, object] = {}
        self._cache_size = cache_size

    @classmethod
    def from_config(cls, eval_cfg=None, **kwargs) -> "OracleJudge":
        oracle_cfg = getattr(eval_cfg, "oracle", None)
        if oracle_cfg is not None and "thresholds" not in kwargs:
            kwargs["thresholds"] = OracleThresholds(**oracle_cfg.model_dump())
        return cls(**kwargs)

    # ------------------------------------------------------------ cached building blocks

    def _cached(self, key: tuple, make):
        if key not in self._cache:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def _detect(self, arr: np.ndarray, connected: bool) -> list[Detection]:
        return detect(arr, full_dist=self.t.full_dist, zero_dist=self.t.zero_dist, connected=connected)

    def reference_blobs(self, scene: Scene) -> dict[str, Detection]:
        """Colour -> the subject's whole visible blob in the exact render of `scene`."""
        return self._cached(("scene", scene.to_json()), lambda: {d.colour: d for d in self._detect(render_array(scene), False)})

    def image_blobs(self, image, size: int) -> tuple[np.ndarray, dict[str, list[Detection]]]:
        arr = resize_to(to_array(image), size)
        key = ("image", size, hashlib.sha1(arr.tobytes()).hexdigest())
        return arr, self._cached(key, lambda: by_colour(self._detect(arr, True)))

    # ------------------------------------------------------------ the judge protocol

    def composition(self, case, image) -> tuple[float, float, tuple[str, str]]:
        a = self.analyse(case, image)
        return a.pf, a.sc, (a.pf_reason, a.sc_reason)

    def presence(self, case, ref_index: int, phrase: str, image) -> tuple[int, str]:
        target = _require_target(case)
        ref = _require_reference(case, ref_index)
        phrases = case.subject_list[ref_index]
        if phrase not in phrases:
            raise ValueError(f"case {case.key}: {phrase!r} is not a candidate of reference {ref_index} ({phrases})")
        j = phrases.index(phrase)
        if j >= len(ref.placements):
            raise ValueError(
                f"case {case.key}: reference {ref_index} has {len(ref.placements)} placements but subject_list "
                f"names {len(phrases)} candidates; the ground truth does not match data.jsonl"
            )
        subject = ref.placements[j].subject
        expected = self._expected_area(subject.colour, target, ref)
        _, blobs = self.image_blobs(image, target.size)
        found = blobs.get(subject.colour, [])
        largest = max((d.area for d in found), default=0)
        needed = self.t.presence_fraction * expected
        present = int(largest > 0 and largest >= needed)
        verdict = "present" if present else "absent"
        return present, (
            f"{phrase!r} ({subject.name}, image {ref_index + 1}): largest {subject.colour} blob {largest} px "
            f"{'>=' if present else '<'} {needed:.1f} px ({self.t.presence_fraction:g} x expected {expected:.0f} px): {verdict}"
        )

    # ------------------------------------------------------------ analysis

    def _expected_area(self, colour: str, target: Scene, ref: Scene | None) -> float:
        gt = self.reference_blobs(target).get(colour)
        if gt is not None:
            return float(gt.area)
        if ref is not None and colour in self.reference_blobs(ref):
            return float(self.reference_blobs(ref)[colour].area)
        areas = [d.area for d in self.reference_blobs(target).values()]
        return float(np.median(areas)) if areas else target.size**2 / 16

    def analyse(self, case, image) -> CaseAnalysis:
        """Every figure behind PF and SC, with reasons."""
        target = _require_target(case)
        t = self.t
        arr, blobs = self.image_blobs(image, target.size)
        gt_blobs = self.reference_blobs(target)

        scores: list[SubjectScore] = []
        used: set[int] = set()
        for p in target.placements:
            gt = gt_blobs.get(p.subject.colour)
            if gt is None or any(s.colour == p.subject.colour for s in scores):
                continue  # fully occluded in the ground truth: nothing to ask of the output
            s = SubjectScore(name=p.subject.name, colour=p.subject.colour, gt=gt, match=None)
            cands = blobs.get(p.subject.colour, [])
            if cands:
                # pieces over the ground-truth box are one subject (split by blur or an occluder)
                over = [d for d in cands if bbox_iou(d.bbox, gt.bbox) > 0] or [max(cands, key=lambda d: d.area)]
                used.update(id(d) for d in over)
                m = s.match = merge(over)
                s.presence = min(1.0, m.area / (t.soft_presence_fraction * gt.area))
                s.position = min(1.0, bbox_iou(m.bbox, gt.bbox) / t.position_iou_full)
                dist = float(np.linalg.norm(np.subtract(m.mean_rgb, gt.mean_rgb)))
                s.colour_score = float(ramp(dist, t.colour_full, t.colour_zero))
                s.shape = float(ramp(1.0 - aligned_mask_iou(m, gt), 1.0 - t.shape_iou_full, 1.0 - t.shape_iou_zero))
                s.texture = texture_similarity(m, gt)
                s.size = min(m.area, gt.area) / max(m.area, gt.area)
            scores.append(s)

        extras = self._extras(case, target, blobs, used, scores)
        extra_weight = sum(e.weight for e in extras)
        penalty = 1.0 / (1.0 + extra_weight)
        subject_pf = float(np.mean([s.pf(t) for s in scores])) if scores else 1.0
        source = background_source(case)
        background = self._background(arr, target) if source else None
        bg_factor = 1.0
        if source == "text":
            bg_factor = 1.0 - t.pf_background_weight + t.pf_background_weight * background
        pf = 10.0 * subject_pf * bg_factor * penalty

        items = [s.sc(t) for s in scores] + ([10.0 * background] if source == "reference" else [])
        sc = float(np.mean(items)) if items else 0.0

        pf_reason = self._pf_reason(scores, extras, penalty, pf)
        if source == "text":
            pf_reason += f"; background {target.background} (named in the instruction): {background:.2f} -> x{bg_factor:.2f}"
        sc_reason = self._sc_reason(scores, background if source == "reference" else None, target.background, sc)
        return CaseAnalysis(pf=pf, sc=sc, pf_reason=pf_reason, sc_reason=sc_reason, subjects=scores, extras=extras, background=background)

    def _extras(self, case, target, blobs, used, scores) -> list[Extra]:
        t = self.t
        required = {s.colour: s for s in scores}
        # where each non-target colour comes from: (reference index, blob in that reference)
        origin: dict[str, tuple[int, Detection, str]] = {}
        for i, ref in enumerate(case.references):
            if ref is None:
                continue
            ref_blobs = self.reference_blobs(ref)
            for p in ref.placements:
                if p.subject.colour in ref_blobs and p.subject.colour not in origin:
                    origin[p.subject.colour] = (i, ref_blobs[p.subject.colour], p.subject.name)
        typical = float(np.median([s.gt.area for s in scores])) if scores else target.size**2 / 16
        out = []
        for colour, dets in blobs.items():
            for d in dets:
                if id(d) in used:
                    continue
                if colour in required:
                    expected, what = required[colour].gt.area, f"duplicate {required[colour].name}"
                elif colour in origin:
                    i, ref_blob, name = origin[colour]
                    expected, what = ref_blob.area, f"distractor {name} from image {i + 1}"
                else:
                    expected, what = typical, f"hallucinated {colour} subject"
                weight = min(1.0, d.area / expected) if d.area >= t.presence_fraction * expected else 0.0
                out.append(Extra(colour=colour, area=d.area, expected=float(expected), weight=weight, what=what))
        return out

    def _background(self, arr: np.ndarray, target: Scene) -> float:
        gt = render_array(target)
        covered = np.zeros(gt.shape[:2], dtype=bool)
        for i in range(len(target.placements)):
            covered |= own_mask(target, i)
        # one pixel of margin: a slightly shifted subject should not count as a wrong background
        covered = ndimage.binary_dilation(covered, structure=np.ones((3, 3), dtype=bool))
        region = ~covered
        if not region.any():
            return 1.0
        dist = np.linalg.norm(arr[region].astype(float) - gt[region].astype(float), axis=-1)
        return float(ramp(dist, self.t.background_full, self.t.background_zero).mean())

    # ------------------------------------------------------------ reasons

    def _pf_reason(self, scores, extras, penalty, pf) -> str:
        found = sum(s.match is not None for s in scores)
        parts = [f"{found}/{len(scores)} required subjects found"]
        for s in scores:
            if s.match is None:
                parts.append(f"{s.name}: missing")
            else:
                parts.append(
                    f"{s.name}: presence {s.presence:.2f}, position {s.position:.2f} "
                    f"(bbox IoU {bbox_iou(s.match.bbox, s.gt.bbox):.2f})"
                )
        counted = [e for e in extras if e.weight > 0]
        if counted:
            parts.append(
                "extra subjects: " + ", ".join(f"{e.what} ({e.area} px, weight {e.weight:.2f})" for e in counted)
                + f" -> x{penalty:.2f}"
            )
        else:
            parts.append("no extra subjects")
        return f"PF {pf:.2f}: " + "; ".join(parts)

    def _sc_reason(self, scores, background, background_name, sc) -> str:
        t = self.t
        parts = []
        for s in scores:
            if s.match is None:
                parts.append(f"{s.name}: not generated (0)")
            else:
                parts.append(
                    f"{s.name}: colour {s.colour_score:.2f}, shape {s.shape:.2f}, texture {s.texture:.2f}, "
                    f"size {s.size:.2f} -> {s.sc(t):.2f}"
                )
        if background is not None:
            parts.append(f"background {background_name}: {background:.2f} -> {10 * background:.2f}")
        return f"SC {sc:.2f}: " + "; ".join(parts or ["nothing to compare"])


def _require_target(case) -> Scene:
    if getattr(case, "target", None) is None:
        raise ValueError(
            f"case {getattr(case, 'key', '?')}: the oracle judge needs the ground-truth target scene; "
            "the benchmark folder lacks ground_truth.jsonl (rebuild it with data.formats.sconeeval.write_bench) "
            "or use eval.judge=openai"
        )
    return case.target


def _require_reference(case, i: int) -> Scene:
    if not 0 <= i < len(case.references):
        raise IndexError(f"case {case.key}: reference index {i} out of range ({len(case.references)} references)")
    ref = case.references[i]
    if ref is None:
        raise ValueError(f"case {case.key}: reference {i} has no ground-truth scene (ground_truth.jsonl missing?)")
    return ref


def background_source(case) -> str | None:
    """Where the instruction takes the background from: 'reference' (an input image that shows only a
    scene: judged as identity, in SC), 'text' (the scene's name is a word of the instruction: judged as
    instruction following, in PF) or None (unspecified: not judged)."""
    if any(ref is not None and not ref.placements for ref in case.references):
        return "reference"
    words = set(case.instruction.lower().replace(",", " ").split())
    if case.target is not None and case.target.background in words:
        return "text"
    return None
