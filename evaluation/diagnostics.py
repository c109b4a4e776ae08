"""Diagnostics that make the methods visible, per checkpoint, with the subject world's exact ground truth.

Three pieces, all on the SconeEval benchmark the evaluate step has just scored (no new sampling):

1. Bridge localisation. For every case, one forward of the generation context (references, instruction) gives the
   understanding bridge's relevance s of every reference ViT token (model.pipeline.BagelPipeline.bridge_relevance:
   model.bagel.bridge, Eq. 1-3 at `model.bridge.early_layer`; read-only). The truth is the rendered mask of the
   *referred* subject of each reference (the candidate with subject_label 1; the others are its distractors),
   averaged onto the ViT token grid (`token_cover`: the share of each token's pixels the subject shows in, after
   occlusion). A token is
       the referred subject's      when it covers >= MIN_COVER of the token and at least as much as the distractors;
       distractor / background     when the referred subject shows in none of its pixels;
       left out                    otherwise (a sliver of the subject, or a token a distractor dominates).
   ROC AUC of s, referred against the rest (`bridge_auc`) and referred against distractor tokens only
   (`bridge_auc_distractors`, references with distractors), per reference, averaged per case, then over cases.
   1.0: s ranks every referred token above every other; 0.5: no better than chance (ties count half).
   Also the share of each side the bridge keeps at tau (s >= tau, as the mask does): `bridge_kept_referred`,
   `bridge_kept_other`. An overlay per case (`overlays/<key>.png`): each subject reference, and beside it s as a
   heat map (min..max of the case) with the referred subject outlined in white and distractors in black.
2. Self-judge agreement. SRUM's reward protocol (evaluation.judges.rewards) from the `self` judge (the checkpoint's
   understanding expert) and from the `oracle` (the exact target scene) on the same generated images: the first
   sampling round's (`images_try1`), regions = blobs of the target's colours (SRUM prompts name every subject's
   colour; SconeEval instructions often do not, so the target supplies them), both judges given the same regions.
   Pearson r and sign agreement of the global scores and of the regional scores (as `scone bench srum-ablation`).
3. A contact sheet (`contact_sheet.png`): per case a row of references, instruction, target, generated.

`run_diagnostics` writes the pictures and `diagnostics.json` (per case) into a folder and returns the result;
`headline` is the flat metrics dict (the DVC metrics file), `mlflow_metrics` the same under DIAG_PREFIX.

Over 400 lines on purpose: the three diagnostics (bridge localisation, self-judge agreement, contact sheet) share
the case and ground-truth handling; each is a short section.
"""
from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DIAG_PREFIX = "diagnostics."  # MLflow metric names: diagnostics.bridge_auc, ... (dashboards.diagnostics.PREFIX)
MIN_COVER = 0.1  # a token is the referred subject's when it shows in at least this share of the token's pixels
THUMB = 96  # contact sheet: side of every image
PANEL = 128  # overlay: side of every panel
FILES = {"details": "diagnostics.json", "contact_sheet": "contact_sheet.png", "overlays": "overlays"}


# ---------------------------------------------------------------------------------------- ground truth per token


@dataclass(frozen=True)
class TokenLabels:
    referred: np.ndarray  # bool (rows, cols): the referred subject's tokens
    other: np.ndarray  # bool: tokens without any pixel of it (distractors and background)
    distractor: np.ndarray  # bool: tokens of `other` in which a distractor shows


def token_labels(scene, referred: int, grid: tuple[int, int], min_cover: float = MIN_COVER) -> TokenLabels:
    """Who each token of a reference scene belongs to (module docstring), from its rendered subject masks."""
    from data.render import subject_mask, token_cover

    ref = token_cover(subject_mask(scene, referred), grid)
    dis = np.zeros_like(ref)
    others = [j for j in range(len(scene.placements)) if j != referred]
    if others:
        union = np.zeros((scene.size, scene.size), dtype=bool)
        for j in others:
            union |= subject_mask(scene, j)
        dis = token_cover(union, grid)
    referred_tokens = (ref >= min_cover) & (ref >= dis)
    other = ref == 0
    return TokenLabels(referred_tokens, other, other & (dis > 0))


def referred_index(case, ref_index: int) -> int | None:
    """The placement the case refers to in reference `ref_index` (subject_label 1), None for a scene-only reference
    or a reference without ground truth."""
    labels = case.subject_label[ref_index] if ref_index < len(case.subject_label) else []
    scene = case.references[ref_index] if ref_index < len(case.references) else None
    if scene is None or not scene.placements or labels.count(1) != 1:
        return None
    j = labels.index(1)
    return j if j < len(scene.placements) else None


# ---------------------------------------------------------------------------------------- statistics


def roc_auc(scores, positive, negative) -> float | None:
    """ROC AUC of `scores` for the `positive` against the `negative` entries (boolean masks of the same shape):
    the chance that a positive scores above a negative, ties counting half. None when either side is empty."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = s[np.asarray(positive, dtype=bool).ravel()], s[np.asarray(negative, dtype=bool).ravel()]
    if not len(pos) or not len(neg):
        return None
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson r; None with fewer than two pairs or a constant side."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def sign_agreement(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Share of pairs whose scores have the same sign (0 only agrees with 0), as scone bench srum-ablation."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not len(x):
        return None
    return float(np.mean(np.sign(x) == np.sign(y)))


def agreement(pairs: Sequence[tuple[float, float]]) -> dict:
    """{n, pearson, sign_agreement} of (self, oracle) score pairs."""
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    return {"n": len(pairs), "pearson": pearson(a, b), "sign_agreement": sign_agreement(a, b)}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ---------------------------------------------------------------------------------------- bridge localisation


def bridge_case(case, relevance: Sequence[np.ndarray], tau: float | None = None) -> dict:
    """Localisation of one case from its relevance maps (one (rows, cols) array per reference, as
    BagelPipeline.bridge_relevance returns them)."""
    refs = []
    kept_ref, kept_other = [], []
    for i, s in enumerate(relevance):
        j = referred_index(case, i)
        if j is None:
            continue
        s = np.asarray(s, dtype=np.float32)
        labels = token_labels(case.references[i], j, s.shape)
        entry = {"reference": i, "referred": j, "grid": list(s.shape),
                 "auc": roc_auc(s, labels.referred, labels.other),
                 "auc_distractors": roc_auc(s, labels.referred, labels.distractor),
                 "n_referred": int(labels.referred.sum()), "n_other": int(labels.other.sum()),
                 "n_distractor": int(labels.distractor.sum())}
        if tau is not None:
            kept = s >= tau
            kept_ref += list(kept[labels.referred])
            kept_other += list(kept[labels.other])
        refs.append(entry)
    return {"key": case.key, "task_type": case.task_type,
            "auc": _mean(r["auc"] for r in refs), "auc_distractors": _mean(r["auc_distractors"] for r in refs),
            "kept_referred": float(np.mean(kept_ref)) if kept_ref else None,
            "kept_other": float(np.mean(kept_other)) if kept_other else None,
            "s_range": [float(min(np.min(s) for s in relevance)), float(max(np.max(s) for s in relevance))]
            if len(relevance) else None,
            "references": refs}


def bridge_summary(per_case: Sequence[dict]) -> dict:
    return {"auc": _mean(c["auc"] for c in per_case),
            "auc_distractors": _mean(c["auc_distractors"] for c in per_case),
            "kept_referred": _mean(c["kept_referred"] for c in per_case),
            "kept_other": _mean(c["kept_other"] for c in per_case),
            "cases": sum(c["auc"] is not None for c in per_case),
            "cases_with_distractors": sum(c["auc_distractors"] is not None for c in per_case)}


# ---------------------------------------------------------------------------------------- pictures


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _upscale(image: np.ndarray, side: int) -> Image.Image:
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((side, side), Image.NEAREST)


def _outline(mask: np.ndarray, side: int) -> np.ndarray:
    """Boundary pixels (bool, side x side) of a mask shown at `side` (nearest upscaling)."""
    m = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((side, side), Image.NEAREST)) > 0
    p = np.pad(m, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge = m & ~inner
    return edge | np.roll(edge, 1, axis=0) & m | np.roll(edge, 1, axis=1) & m  # two pixels wide, inside the mask


def heat_overlay(image: np.ndarray, s: np.ndarray, lo: float, hi: float, referred_mask: np.ndarray | None = None,
                 distractor_masks: Sequence[np.ndarray] = (), side: int = PANEL, alpha: float = 0.6) -> np.ndarray:
    """`image` at `side` px with s (token grid, nearest: one block per token) as a heat map scaled lo..hi, the
    referred subject's outline in white and the distractors' in black."""
    from matplotlib import colormaps

    base = np.asarray(_upscale(image, side), dtype=np.float32)
    norm = np.clip((np.asarray(s, dtype=np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    heat = np.asarray(Image.fromarray(norm).resize((side, side), Image.NEAREST), dtype=np.float32)
    rgb = colormaps["inferno"](heat)[..., :3] * 255.0
    out = (1 - alpha) * base + alpha * rgb
    for m in distractor_masks:
        out[_outline(m, side)] = 0.0
    if referred_mask is not None:
        out[_outline(referred_mask, side)] = 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def case_overlay(case, references: Sequence[np.ndarray], relevance: Sequence[np.ndarray], entry: dict,
                 path: Path) -> Path:
    """The overlay picture of one case: a pair of panels (reference, heat map) per subject reference, the case's
    AUC and s range above them, the instruction below."""
    from data.render import subject_mask

    shown = [r["reference"] for r in entry["references"]] or list(range(len(references)))
    lo, hi = entry["s_range"] or (0.0, 1.0)
    panels = []
    for i in shown:
        scene = case.references[i] if i < len(case.references) else None
        j = referred_index(case, i)
        ref_mask = subject_mask(scene, j) if j is not None else None
        distractors = [subject_mask(scene, k) for k in range(len(scene.placements)) if k != j] if scene else []
        panels.append((np.asarray(_upscale(references[i], PANEL)),
                       heat_overlay(references[i], relevance[i], lo, hi, ref_mask, distractors)))
    font, gap, head, foot = _font(11), 6, 30, 34
    width = max(1, len(panels)) * (2 * PANEL + 3 * gap)
    sheet = Image.new("RGB", (max(width, 360), head + PANEL + foot), "white")
    draw = ImageDraw.Draw(sheet)

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    draw.text((gap, 3), f"{case.key}  AUC {f(entry['auc'])} (vs distractors {f(entry['auc_distractors'])})",
              fill="black", font=font)
    draw.text((gap, 16), f"s {lo:.3f} (dark) .. {hi:.3f} (bright); referred: white, distractors: black",
              fill="dimgray", font=font)
    for k, (plain, heat) in enumerate(panels):
        x = gap + k * (2 * PANEL + 3 * gap)
        sheet.paste(Image.fromarray(plain), (x, head))
        sheet.paste(Image.fromarray(heat), (x + PANEL + gap, head))
    for n, line in enumerate(textwrap.wrap(case.instruction, width=max(30, sheet.width // 6))[:2]):
        draw.text((gap, head + PANEL + 4 + 13 * n), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


@dataclass
class SheetRow:
    label: str
    references: list[np.ndarray]
    instruction: str
    target: np.ndarray | None
    generated: np.ndarray | None


def contact_sheet(rows: Sequence[SheetRow], path: Path, thumb: int = THUMB, text_width: int = 260) -> Path:
    """One image: a header, then per row its references, the instruction (wrapped), the target and the generated
    image, every image at `thumb` px (nearest: the pixels as they are). A missing image is a grey box."""
    font, gap, head = _font(11), 6, 20
    n_refs = max((len(r.references) for r in rows), default=1) or 1
    row_h = thumb + 2 * gap
    x_text = gap + n_refs * (thumb + gap)
    x_target = x_text + text_width + gap
    x_generated = x_target + thumb + gap
    width = x_generated + thumb + gap
    sheet = Image.new("RGB", (width, head + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for x, title in ((gap, "references"), (x_text, "instruction"), (x_target, "target"), (x_generated, "generated")):
        draw.text((x, 4), title, fill="black", font=font)

    def put(image, x, y):
        if image is None:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(200, 200, 200))
            draw.text((x + 4, y + thumb // 2 - 6), "missing", fill="black", font=font)
        else:
            sheet.paste(_upscale(image, thumb), (x, y))

    for k, r in enumerate(rows):
        y = head + k * row_h + gap
        if k:
            draw.line((0, y - gap // 2, width, y - gap // 2), fill=(220, 220, 220))
        for i, ref in enumerate(r.references):
            put(ref, gap + i * (thumb + gap), y)
        draw.text((x_text, y), r.label, fill="dimgray", font=font)
        for n, line in enumerate(textwrap.wrap(r.instruction, width=max(20, text_width // 6))[:6]):
            draw.text((x_text, y + 14 + 13 * n), line, fill="black", font=font)
        put(r.target, x_target, y)
        put(r.generated, x_generated, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ---------------------------------------------------------------------------------------- self vs oracle judge


def case_row(case) -> dict:
    """A SconeEval case as a prompt row of SRUM's reward protocol: its instruction, its target scene, and whether
    the instruction places the subjects (the plan's layout; else two or more subjects in the target)."""
    plan = (case.meta or {}).get("plan") or {}
    layout = plan.get("layout")
    stated = layout != "single" if layout is not None else len(case.target.placements) >= 2
    return {"key": case.key, "prompt": case.instruction, "category": case.task_type, "target": case.target,
            "layout_specified": bool(stated)}


def target_regions(image: np.ndarray, target, max_regions: int | None = None) -> list:
    """Region proposals as SRUM makes them (colour blobs, largest first), of the target's colours."""
    from evaluation.detect import detect
    from evaluation.judges.rewards import MAX_REGIONS, Region

    colours = sorted({p.subject.colour for p in target.placements})
    found = detect(image, colours=colours) if colours else []
    return [Region(d.colour, d.bbox, d) for d in found[: max_regions or MAX_REGIONS]]


def judge_pairs(cases: Sequence, images: Sequence[np.ndarray | None], self_judge, oracle_judge) -> dict:
    """Both reward judges on every (case, image) with an image and a target: the score pairs and the records."""
    from evaluation.detect import resize_to, to_array

    glob, regions, records = [], [], []
    for case, image in zip(cases, images):
        if image is None or case.target is None:
            continue
        row = case_row(case)
        arr = resize_to(to_array(image), case.target.size)
        props = target_regions(arr, case.target)
        g_self, r_self = self_judge.judge(row, arr, props)
        g_oracle, r_oracle = oracle_judge.judge(row, arr, props)
        glob.append((float(g_self.score), float(g_oracle.score)))
        pairs = [(float(a.score), float(b.score)) for a, b in zip(r_self, r_oracle)]
        regions += pairs
        records.append({"key": case.key, "global": glob[-1], "regions": pairs,
                        "region_colours": [p.colour for p in props]})
    return {"global": agreement(glob), "regions": agreement(regions), "per_case": records}


# ---------------------------------------------------------------------------------------- the whole


def generated_image(images_dir: Path | None, case) -> np.ndarray | None:
    """The image SconeEval generated for `case` in that round folder (images_try<r>/<task>/<key>.png), if any."""
    if images_dir is None:
        return None
    path = Path(images_dir) / case.task_type / f"{case.key}.png"
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8) if path.is_file() else None


def _target_image(bench_dir: Path, case) -> np.ndarray | None:
    path = Path(bench_dir) / "targets" / f"{case.key}.png"
    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    if case.target is not None:
        from data.render import render_array

        return render_array(case.target)
    return None


def _showcase(per_case: Sequence[dict]) -> str | None:
    """The case whose overlay the report shows: the first with distractors, else the first with an AUC."""
    for want in ("auc_distractors", "auc"):
        for c in per_case:
            if c[want] is not None:
                return c["key"]
    return None


def run_diagnostics(pipe, bench_dir: str | Path, images_dir: str | Path | None, out_dir: str | Path, *,
                    self_judge=None, oracle_judge=None) -> dict:
    """Bridge localisation (one forward per case), self vs oracle judge agreement on the generated images of
    `images_dir` (SconeEval's images_try1; None or missing: skipped) and the contact sheet; pictures and
    `diagnostics.json` into `out_dir`. `pipe`: the checkpoint's model.pipeline.BagelPipeline (with its bridge
    settings); the judges default to SRUM's `self` (over `pipe`) and `oracle` reward judges."""
    from data.formats.sconeeval import read_bench
    from evaluation.runner import reference_images

    t0 = time.perf_counter()
    bench_dir, out = Path(bench_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = read_bench(bench_dir)
    refs = [reference_images(c) for c in cases]
    tau = getattr(getattr(pipe, "bridge_cfg", None), "tau", None)

    t = time.perf_counter()
    per_case, relevances = [], []
    for case, images in zip(cases, refs):
        s = pipe.bridge_relevance(images, case.instruction) if any(c is not None for c in case.references) else None
        s = s or []
        relevances.append(s)
        per_case.append(bridge_case(case, s, tau))
    bridge_s = time.perf_counter() - t
    for case, images, s, entry in zip(cases, refs, relevances, per_case):
        if entry["references"]:
            case_overlay(case, images, s, entry, out / FILES["overlays"] / f"{case.key}.png")

    images_dir = Path(images_dir) if images_dir is not None and Path(images_dir).is_dir() else None
    generated = [generated_image(images_dir, c) for c in cases]
    t = time.perf_counter()
    judges = None
    if any(g is not None for g in generated):
        from evaluation.judges.rewards import make_reward_judge

        self_judge = self_judge or make_reward_judge("self", pipeline=pipe)
        oracle_judge = oracle_judge or make_reward_judge("oracle")
        judges = judge_pairs(cases, generated, self_judge, oracle_judge)
    judge_s = time.perf_counter() - t

    contact_sheet([SheetRow(f"{c.key} ({c.task_type})", r, c.instruction, _target_image(bench_dir, c), g)
                   for c, r, g in zip(cases, refs, generated)], out / FILES["contact_sheet"])
    showcase = _showcase(per_case)
    judged = {j["key"]: j for j in (judges or {}).get("per_case", [])}
    result = {
        "bridge": {**bridge_summary(per_case), "tau": tau, "min_cover": MIN_COVER},
        "self_vs_oracle": None if judges is None else {"global": judges["global"], "regions": judges["regions"],
                                                        "images": str(images_dir.name) if images_dir else None},
        "cases": len(cases),
        "pictures": {"contact_sheet": FILES["contact_sheet"],
                     "overlay": f"{FILES['overlays']}/{showcase}.png" if showcase else None},
        "seconds": {"bridge": round(bridge_s, 3), "judges": round(judge_s, 3),
                    "total": round(time.perf_counter() - t0, 3)},
        "per_case": [{**entry, "judges": judged.get(entry["key"])} for entry in per_case],
    }
    (out / FILES["details"]).write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


def headline(result: dict) -> dict[str, float | int]:
    """The flat figures of a `run_diagnostics` result (undefined ones left out): the DVC metrics file."""
    b, j = result["bridge"], result.get("self_vs_oracle") or {}
    flat = {"bridge_auc": b["auc"], "bridge_auc_distractors": b["auc_distractors"],
            "bridge_kept_referred": b["kept_referred"], "bridge_kept_other": b["kept_other"],
            "bridge_cases": b["cases"]}
    for side, name in (("global", "global"), ("regions", "region")):
        a = j.get(side) or {}
        flat |= {f"self_oracle_{name}_r": a.get("pearson"), f"self_oracle_{name}_sign": a.get("sign_agreement"),
                 f"self_oracle_{name}_n": a.get("n")}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in flat.items() if v is not None}


def mlflow_metrics(result: dict) -> dict[str, float]:
    """`headline` under DIAG_PREFIX, plus the seconds the diagnostics took: the checkpoint run's metrics."""
    return {f"{DIAG_PREFIX}{k}": float(v) for k, v in headline(result).items()} | {
        f"{DIAG_PREFIX}seconds": float(result["seconds"]["total"])}


def format_summary(name: str, result: dict) -> str:
    h = headline(result)

    def f(k):
        return f"{h[k]:.2f}" if k in h else "n/a"

    return (f"{name} diagnostics: bridge AUC {f('bridge_auc')} (vs distractors {f('bridge_auc_distractors')}, "
            f"kept referred {f('bridge_kept_referred')} / other {f('bridge_kept_other')}); self vs oracle judge "
            f"global r {f('self_oracle_global_r')} sign {f('self_oracle_global_sign')}, regions r "
            f"{f('self_oracle_region_r')} sign {f('self_oracle_region_sign')}; {result['seconds']['total']:.1f} s")
