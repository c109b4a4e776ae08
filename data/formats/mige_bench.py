"""The held-out MIGE benchmark in MIGEBench's layout (MIGE Sec. 4.2.3 and Appendix A; the released inference
script's item fields): subject addition and subject replacement, each case with its source image, the subject
(entity) image, a multimodal instruction whose `<imagehere>` placeholders take the inputs in order, the ground-truth
edited image and the mask of the edited region.

    <dir>/add/add_source/<idx>_source.png         the image to edit            (replace/replace_source/... alike)
    <dir>/add/add_entity/<idx>_entity.png         the subject as the instruction shows it (our inputs)
    <dir>/add/add_entity/<idx>_entity_black.png   the subject alone on black / white, as MIGEBench crops entities
    <dir>/add/add_entity/<idx>_entity_white.png
    <dir>/add/add_target/<idx>_target.png         the ground-truth edited image
    <dir>/add/add_mask/<idx>_mask.png             255 where the edit happens (the new subject; for replacement also
                                                  the replaced one), 0 where the source must survive
    <dir>/data.jsonl                              one MIGEBench item per line (the release keeps the same fields in
                                                  one JSON list; read_mige_bench reads both): idx, edit_type,
                                                  multi_prompt, entity_path (the inputs in placeholder order),
                                                  source_path, image (target), mask_path, object, caption,
                                                  target_caption, entity_path_black, entity_path_white; plus key,
                                                  instruction and input_images (= multi_prompt and entity_path:
                                                  the fields every benchmark folder of this project has)
    <dir>/ground_truth.jsonl                      our extension for the oracle judge: scene graphs, qa, meta

Paths are relative to <dir>.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from data.formats.jsonl import read_jsonl
from data.formats.sconeeval import write_layout
from data.instructions import IMAGE_PLACEHOLDER
from data.records import Case
from data.render import own_mask, render, render_array
from data.scene import Scene

FOLDER = {"addition": "add", "replacement": "replace"}
EDIT_OF_FOLDER = {v: k for k, v in FOLDER.items()}
TASK_OF = {"addition": "subject_addition", "replacement": "subject_replacement"}


def edit_region(case: Case) -> np.ndarray:
    """H x W bool: where the edit happens, from the scene graphs. Addition: the new subject's pixels in the target;
    replacement: the replaced subject's pixels in the source and the new subject's in the target."""
    source = case.references[case.meta["source_image"]]
    target = case.target
    if case.meta["edit_type"] == "addition":
        return own_mask(target, len(target.placements) - 1)
    j = next(i for i, p in enumerate(source.placements) if p.subject.uid == case.meta["replaced"])
    return own_mask(source, j) | own_mask(target, j)


def _entity_on(scene: Scene, colour: tuple[int, int, int]) -> Image.Image:
    arr = render_array(scene)
    arr[~own_mask(scene, 0)] = colour
    return Image.fromarray(arr)


def _caption(case: Case, phrase: str) -> str:
    """The instruction in plain words (MIGE's `caption`)."""
    text = case.instruction
    if case.meta["edit_type"] == "addition":
        return text.replace(IMAGE_PLACEHOLDER, phrase, 1).replace(f" of {IMAGE_PLACEHOLDER}", "")
    return text.replace(f" in {IMAGE_PLACEHOLDER}", "").replace(IMAGE_PLACEHOLDER, phrase)


def target_caption(scene: Scene) -> str:
    names = [p.subject.name for p in scene.placements]
    return f"a {scene.background} scene with " + ", ".join(f"a {n}" for n in names)


def write_mige_bench(cases: Iterable[Case], dir: str | Path) -> Path:
    """Write the benchmark (cases of data.heldout.mige_bench_cases); returns the path of data.jsonl."""
    out = Path(dir)
    for folder in FOLDER.values():
        for part in ("source", "entity", "target", "mask"):
            d = out / folder / f"{folder}_{part}"
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob("*.png"):
                stale.unlink()
    data_lines, truth_lines = [], []
    for case in cases:
        edit, idx = case.meta["edit_type"], case.meta["idx"]
        base = FOLDER[edit]
        src_i = case.meta["source_image"]
        ent_i = 1 - src_i
        rel = lambda part, suffix="": f"{base}/{base}_{part}/{idx}_{part}{suffix}.png"  # noqa: E731
        render(case.references[src_i]).save(out / rel("source"))
        render(case.references[ent_i]).save(out / rel("entity"))
        _entity_on(case.references[ent_i], (0, 0, 0)).save(out / rel("entity", "_black"))
        _entity_on(case.references[ent_i], (255, 255, 255)).save(out / rel("entity", "_white"))
        render(case.target).save(out / rel("target"))
        Image.fromarray(edit_region(case).astype(np.uint8) * 255).save(out / rel("mask"))
        inputs = [rel("source") if i == src_i else rel("entity") for i in range(len(case.references))]
        phrase = case.subject_list[ent_i][0]
        data_lines.append({
            "key": case.key, "idx": idx, "edit_type": edit, "case_type": case.case_type,
            "multi_prompt": case.instruction, "entity_path": inputs,
            "source_path": [rel("source")], "image": rel("target"), "mask_path": [rel("mask")], "object": phrase,
            "caption": _caption(case, phrase), "target_caption": target_caption(case.target),
            "entity_path_black": [rel("entity", "_black")], "entity_path_white": [rel("entity", "_white")],
            "instruction": case.instruction, "input_images": inputs,
        })
        truth_lines.append({"key": case.key, **case.scene_graph(), "qa": [list(p) for p in case.qa], "meta": case.meta})
    write_layout(out, data_lines, truth_lines, "MIGE benchmark")
    return out / "data.jsonl"


def _items(root: Path) -> list[dict]:
    if (root / "data.jsonl").exists():
        return read_jsonl(root / "data.jsonl")
    lists = sorted(root.glob("*.json"))
    if len(lists) == 1:  # the release's JSON list
        return json.loads(lists[0].read_text())
    raise FileNotFoundError(f"{root}: no data.jsonl (or one MIGEBench JSON list); expected a MIGE-Bench-layout folder "
                            "(scone data build mige_bench)")


def _edit_type(item: dict) -> str:
    if item.get("edit_type") in TASK_OF:
        return item["edit_type"]
    folder = Path(item["image"]).parent.parent.name  # .../add/add_target/21_target.jpg
    if folder not in EDIT_OF_FOLDER:
        raise ValueError(f"MIGEBench item {item.get('idx')}: no edit_type and its target is under neither add/ nor replace/")
    return EDIT_OF_FOLDER[folder]


def read_mige_bench(dir: str | Path) -> list[Case]:
    """Cases of a MIGE-Bench-layout folder. meta: edit_type, idx, source_image (index of the source among the
    inputs), input_images, mask_path, target_image (absolute paths) and, with ground_truth.jsonl, the scene graphs
    and the build metadata (the replaced subject's uid)."""
    root = Path(dir)
    truth_path = root / "ground_truth.jsonl"
    truth = {t["key"]: t for t in read_jsonl(truth_path)} if truth_path.exists() else {}
    cases = []
    for n, item in enumerate(_items(root), start=1):
        missing = [f for f in ("idx", "multi_prompt", "entity_path", "source_path", "image") if f not in item]
        if missing:
            raise ValueError(f"{root}: item {n} lacks {missing}")
        edit = _edit_type(item)
        key = str(item.get("key") or f"{edit}_{int(item['idx']):04d}")
        inputs = [str(root / p) for p in item["entity_path"]]
        source = str(root / item["source_path"][0])
        gt = truth.get(key)
        if gt:
            references = [Scene.from_dict(s) for s in gt["references"]]
            target = Scene.from_dict(gt["target"])
            qa, meta = gt.get("qa", []), dict(gt.get("meta", {}))
        else:
            references, target, qa, meta = [None] * len(inputs), None, [], {}
        meta.update(edit_type=edit, idx=item["idx"], input_images=inputs, target_image=str(root / item["image"]),
                    mask_path=[str(root / p) for p in item.get("mask_path", [])])
        meta.setdefault("source_image", inputs.index(source) if source in inputs else 0)
        phrase = item.get("object", "")
        subject_list = [[] if i == meta["source_image"] else [phrase] for i in range(len(inputs))]
        subject_label = [[] if i == meta["source_image"] else [1] for i in range(len(inputs))]
        cases.append(Case(key=key, task_type=TASK_OF[edit], case_type=item.get("case_type", ""),
                          instruction=item["multi_prompt"], references=references, target=target,
                          subject_list=subject_list, subject_label=subject_label, qa=[tuple(p) for p in qa], meta=meta))
    if not cases:
        raise ValueError(f"{root}: the benchmark holds no items")
    return cases
