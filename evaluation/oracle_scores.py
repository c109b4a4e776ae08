"""MICo-Bench and MIGE-Bench figures from the `oracle` judge: exact, from the cases' scene graphs.

The SconeEval oracle (evaluation.judges.oracle, through the Judge protocol of evaluation.judges) gives prompt
following PF and subject consistency SC; detection is evaluation.detect's (colour blobs: a subject is found by its
unique body colour). What MICo and MIGE ask beyond that is measured here, on the generated image resized to the
ground truth's side. Thresholds come from `eval.oracle` (full_dist, zero_dist, presence_fraction,
position_iou_full); the rest are the constants of `SceneThresholds`.

Building blocks
    match(subject)  the generated blobs of the subject's colour over its ground-truth box (the largest blob of the
                    colour when none is), merged; no match when they cover less than presence_fraction x its
                    ground-truth area.
    appearance      0.3 colour + 0.3 shape + 0.2 texture + 0.2 size of the match against the ground-truth blob, in
                    [0, 1] (the oracle's per-subject SC rule / 10): colour 1 at a mean-RGB distance <= 15, 0 at >= 75;
                    shape: aligned silhouette IoU, 1 at >= 0.95, 0 at <= 0.45; texture: detect.texture_similarity;
                    size: min(area, A_gt) / max(area, A_gt).
    placement       0.4 presence + 0.6 position (the oracle's per-subject PF rule / 10): presence = min(1, area /
                    (0.5 A_gt)), position = min(1, bbox IoU / position_iou_full).
    agreement       per pixel 1 at an RGB distance <= 30 from the reference pixel, 0 at >= 80, linear between.

MICo-Bench, Weighted-Ref-VIEScore's inputs (evaluation.mico scores them: W x sqrt(SR x PF) x sqrt(nat x art)):
    sources     one entry per source image. A face source (a character: MICo's ArcFace sources, the bench's
                face_indices) gives identity_similarity = appearance of its match in the output against its blob in
                the reference image (no match: no face found, None), graded through MICo's identity bands. An object
                source is present (1) when it has a match. A scene source (no subjects) is present when the output's
                background agrees with the reference image's on at least half (mean agreement over the reference's
                background pixels, 1 px away from subjects).
    PF, SR      the oracle's PF and SC of the output against the reference image (the case's target scene): MICo's
                subject resemblance is judged against the reference image, as the oracle's SC is.
    artifacts   10 x mean over pixels of clean = (agreement with the nearest colour the renderer can emit) x
                min(1, neighbours on the same surface / 2) (a surface: a subject colour with its texture shade, the
                character parts, a sky, a ground): off-palette pixels (blur, fringes) and speckles (noise, isolated
                pixels of another surface) are the defects of this world. A render scores about 9.9 (a few
                isolated detail pixels), uniform noise about 2.
    naturalness 10 x the best agreement, over the world's scenes, of the output's background pixels (pixels whose
                nearest palette colour is a sky or ground and that lie 1 px or more away from any subject blob)
                with that empty scene's render: one coherent sky over one coherent ground. No background
                pixel at all scores 0. Both PQ figures look at the output alone.
MIGE-Bench (0-10 each; MIGE Sec. 4.2.3 judges editing and subject preservation):
    subject_fidelity       10 x appearance of the new subject's match against its blob in the ground-truth edit.
    instruction_following  10 x placement of the new subject at its ground-truth place x removal, removal = 1 for
                           addition; for replacement 1 - min(1, leftover / A_old) when the replaced subject still
                           has a blob of leftover >= presence_fraction x A_old pixels (A_old: its area in the
                           source), else 1.
    preservation           10 x mean agreement with the source outside the edited region (data.formats.mige_bench
                           .edit_region, grown by 1 px): an output equal to the source scores 10 there, one that
                           repaints every pixel by 80 or more scores 0.
    L1, L2                 pixel distances to the ground-truth edit in [0, 1] (evaluation.mige), lower is better.
A perfect render of the ground truth scores 10 on every 0-10 figure but artifacts (about 9.9), hence about 99.5 on
Weighted-Ref-VIEScore.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data.render import own_mask, render_array
from data.scene import SCENES, Scene
from evaluation.detect import (
    FULL_DIST,
    ZERO_DIST,
    Detection,
    aligned_mask_iou,
    bbox_iou,
    classify,
    detect,
    merge,
    palette,
    ramp,
    resize_to,
    texture_similarity,
    to_array,
)


@dataclass(frozen=True)
class SceneThresholds:
    full_dist: float = FULL_DIST  # palette membership (detection, artifacts): full within this RGB distance ...
    zero_dist: float = ZERO_DIST  # ... none beyond it
    presence_fraction: float = 0.3  # a match needs this share of the ground-truth area (eval.oracle)
    position_iou_full: float = 0.8  # placement's position credit is full at this bbox IoU (eval.oracle)
    soft_presence_fraction: float = 0.5  # placement's presence credit is full at this share
    colour_full: float = 15.0
    colour_zero: float = 75.0
    shape_iou_full: float = 0.95
    shape_iou_zero: float = 0.45
    agree_full: float = 30.0  # pixel agreement: 1 within this RGB distance ...
    agree_zero: float = 80.0  # ... 0 beyond this one
    scene_present: float = 0.5  # a scene source is present at this background agreement
    coherent_neighbours: int = 2  # artifacts: a pixel is clean with this many of its 8 neighbours on its surface
    appearance_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.2, 0.2)  # colour, shape, texture, size

    @classmethod
    def from_config(cls, eval_cfg=None) -> "SceneThresholds":
        oracle = getattr(eval_cfg, "oracle", None)
        if oracle is None:
            return cls()
        return cls(full_dist=oracle.full_dist, zero_dist=oracle.zero_dist, presence_fraction=oracle.presence_fraction,
                   position_iou_full=oracle.position_iou_full)


def _palette_groups() -> np.ndarray:
    """Per palette entry (detect.palette order) the surface it paints: a subject colour with its texture shade, the
    character parts (skin, dark) together, each sky and each ground on its own."""
    names = {}
    out = []
    for e in palette():
        group = e.owner or ("part" if e.name in ("skin", "dark") else e.name)
        out.append(names.setdefault(group, len(names)))
    return np.array(out)


def _need_truth(case) -> Scene:
    if getattr(case, "target", None) is None or any(r is None for r in case.references):
        raise ValueError(f"case {case.key}: the oracle needs the scene graphs (ground_truth.jsonl of the benchmark "
                         "folder); rebuild it with `scone data build`")
    return case.target


class SceneOracle:
    """MICo-Bench and MIGE-Bench figures of generated images (see the module doc); deterministic."""

    name = "oracle"
    deterministic = True

    def __init__(self, eval_cfg=None, judge=None):
        from evaluation.judges import make_judge

        self.t = SceneThresholds.from_config(eval_cfg)
        self.judge = judge if judge is not None else make_judge("oracle", eval_cfg)
        self._scene_blobs: dict[str, dict[str, Detection]] = {}

    # ------------------------------------------------------------ building blocks

    def image(self, image, size: int) -> np.ndarray:
        return resize_to(to_array(image), size)

    def blobs(self, arr: np.ndarray) -> list[Detection]:
        return detect(arr, full_dist=self.t.full_dist, zero_dist=self.t.zero_dist, connected=True)

    def truth_blob(self, scene: Scene, colour: str) -> Detection | None:
        """The subject of `colour` as `scene` renders it (its visible pixels, occluded parts left out)."""
        key = scene.to_json()
        if key not in self._scene_blobs:
            found = detect(render_array(scene), full_dist=self.t.full_dist, zero_dist=self.t.zero_dist,
                           connected=False)
            self._scene_blobs[key] = {d.colour: d for d in found}
        return self._scene_blobs[key].get(colour)

    def match(self, blobs: list[Detection], gt: Detection) -> Detection | None:
        same = [d for d in blobs if d.colour == gt.colour]
        if not same:
            return None
        over = [d for d in same if bbox_iou(d.bbox, gt.bbox) > 0] or [max(same, key=lambda d: d.area)]
        m = merge(over)
        return m if m.area >= self.t.presence_fraction * gt.area else None

    def appearance(self, m: Detection | None, gt: Detection) -> float:
        if m is None:
            return 0.0
        t = self.t
        colour = float(ramp(float(np.linalg.norm(np.subtract(m.mean_rgb, gt.mean_rgb))), t.colour_full, t.colour_zero))
        shape = float(ramp(1.0 - aligned_mask_iou(m, gt), 1.0 - t.shape_iou_full, 1.0 - t.shape_iou_zero))
        texture = texture_similarity(m, gt)
        size = min(m.area, gt.area) / max(m.area, gt.area)
        wc, ws, wt, wz = t.appearance_weights
        return wc * colour + ws * shape + wt * texture + wz * size

    def placement(self, m: Detection | None, gt: Detection) -> float:
        if m is None:
            return 0.0
        presence = min(1.0, m.area / (self.t.soft_presence_fraction * gt.area))
        position = min(1.0, bbox_iou(m.bbox, gt.bbox) / self.t.position_iou_full)
        return 0.4 * presence + 0.6 * position

    def agreement(self, arr: np.ndarray, reference: np.ndarray, region: np.ndarray) -> float:
        """Mean per-pixel agreement of `arr` with `reference` over `region` (1 when the region is empty)."""
        if not region.any():
            return 1.0
        dist = np.linalg.norm(arr[region].astype(float) - reference[region].astype(float), axis=-1)
        return float(ramp(dist, self.t.agree_full, self.t.agree_zero).mean())

    @staticmethod
    def _grow(mask: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(mask, structure=np.ones((3, 3), dtype=bool))

    def background_region(self, scene: Scene) -> np.ndarray:
        """The scene's pixels 1 px or more away from every subject."""
        covered = np.zeros((scene.size, scene.size), dtype=bool)
        for i in range(len(scene.placements)):
            covered |= own_mask(scene, i)
        return ~self._grow(covered)

    def artifacts(self, arr: np.ndarray) -> float:
        classes = classify(arr, self.t.full_dist, self.t.zero_dist)
        group = _palette_groups()[classes.nearest]
        h, w = group.shape
        padded = np.pad(group, 1, mode="edge")
        same = sum((padded[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w] == group)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
        clean = ramp(classes.distance, self.t.full_dist, self.t.zero_dist) * np.minimum(1.0, same / self.t.coherent_neighbours)
        return 10.0 * float(clean.mean())

    def naturalness(self, arr: np.ndarray, blobs: list[Detection] | None = None) -> float:
        blobs = self.blobs(arr) if blobs is None else blobs
        entries = palette()
        scenic = np.array([e.name.endswith(("_sky", "_ground")) for e in entries])
        region = scenic[classify(arr, self.t.full_dist, self.t.zero_dist).nearest]
        if blobs:
            region &= ~self._grow(np.logical_or.reduce([d.mask for d in blobs]))
        if not region.any():
            return 0.0
        size = arr.shape[0]
        return 10.0 * max(self.agreement(arr, render_array(Scene(background=name, size=size)), region)
                          for name in SCENES)

    # ------------------------------------------------------------ MICo-Bench

    def mico(self, case, image) -> dict:
        """The judged case: sources (W's inputs), PF, SR, naturalness, artifacts and the reasons behind them."""
        target = _need_truth(case)
        arr = self.image(image, target.size)
        blobs = self.blobs(arr)
        sources, notes = [], []
        for i, ref in enumerate(case.references):
            if not ref.placements:  # a scene source
                agree = self.agreement(arr, render_array(target), self.background_region(target))
                sources.append({"present": int(agree >= self.t.scene_present)})
                notes.append(f"image {i + 1} scene {ref.background}: background agreement {agree:.2f}")
                continue
            subject = ref.placements[0].subject
            gt = self.truth_blob(target, subject.colour) or self.truth_blob(ref, subject.colour)
            m = self.match(blobs, gt) if gt is not None else None
            if subject.domain == "character":
                similarity = None if m is None else round(self.appearance(m, gt), 6)
                sources.append({"identity_similarity": similarity})
                notes.append(f"image {i + 1} {subject.name} (face): " +
                             ("no match" if m is None else f"identity similarity {similarity:.2f}"))
            else:
                sources.append({"present": int(m is not None)})
                notes.append(f"image {i + 1} {subject.name}: {'present' if m is not None else 'absent'}")
        pf, sr, reasons = self.judge.composition(case, arr)
        pf_reason, sr_reason = (reasons, reasons) if isinstance(reasons, str) else reasons
        return {"sources": sources, "PF": float(pf), "SR": float(sr),
                "naturalness": self.naturalness(arr, blobs), "artifacts": self.artifacts(arr),
                "W_reason": "; ".join(notes), "PF_reason": pf_reason, "SR_reason": sr_reason}

    # ------------------------------------------------------------ MIGE-Bench

    def mige(self, case, image) -> dict:
        """subject_fidelity, instruction_following, preservation (0-10), L1 and L2 to the ground truth, reasons."""
        from data.formats.mige_bench import edit_region
        from evaluation.mige import pixel_l1, pixel_l2

        target = _need_truth(case)
        arr = self.image(image, target.size)
        blobs = self.blobs(arr)
        src_i = case.meta["source_image"]
        source = case.references[src_i]
        new = case.references[1 - src_i].placements[0].subject
        gt = self.truth_blob(target, new.colour)
        m = self.match(blobs, gt) if gt is not None else None
        fidelity = 10.0 * self.appearance(m, gt) if gt is not None else 0.0
        placed = self.placement(m, gt) if gt is not None else 0.0
        removal, note = 1.0, ""
        if case.meta["edit_type"] == "replacement":
            old = next(p.subject for p in source.placements if p.subject.uid == case.meta["replaced"])
            old_gt = self.truth_blob(source, old.colour)
            left = max((d.area for d in blobs if d.colour == old.colour), default=0)
            if old_gt is not None and left >= self.t.presence_fraction * old_gt.area:
                removal = 1.0 - min(1.0, left / old_gt.area)
            note = f"; replaced {old.name}: {left} px left -> removal {removal:.2f}"
        keep = ~self._grow(edit_region(case))
        preservation = 10.0 * self.agreement(arr, render_array(source), keep)
        truth = render_array(target)
        return {
            "subject_fidelity": fidelity,
            "instruction_following": 10.0 * placed * removal,
            "preservation": preservation,
            "L1": pixel_l1(arr, truth), "L2": pixel_l2(arr, truth),
            "reason": (f"{new.name}: " + ("not found" if m is None else
                       f"appearance {fidelity / 10:.2f}, placement {placed:.2f}") + note +
                       f"; source kept on {int(keep.sum())} px: {preservation:.2f}"),
        }
