"""The held-out MICo benchmark in MICo-Bench's layout (MICo-150K Sec. 4.3: each case holds its source images, the
text prompt, a verified reference image that contains every source, and the indices of the sources that show a
face, whose weight is graded by identity similarity instead of a yes/no answer).

    <dir>/data.jsonl             one case per line:
                                 key, category (task group: Object | Person | HOI | De&Re), sub_task,
                                 composition_type (e.g. 1P2O, De&Re), instruction (the prompt), input_images (the
                                 source images in the prompt's order, paths relative to <dir>), face_indices (0-based
                                 sources showing a character: graded identity weight), reference_image,
                                 subject_list, subject_label (each source's referring phrase; a scene source has none)
    <dir>/sources/<key>_<i>.png  source image i (1-based, as the prompt counts them)
    <dir>/references/<key>.png   the reference image: what the composition must look like
    <dir>/ground_truth.jsonl     our extension for the oracle judge: key, references, target (scene graphs), qa, meta

`read_mico_bench` also reads a folder without ground_truth.jsonl (scene graphs are then None: a VLM judge only).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from data.formats.sconeeval import rows_with_truth, write_layout
from data.records import Case
from data.render import render

DATA_FIELDS = ("key", "category", "sub_task", "composition_type", "instruction", "input_images", "face_indices",
               "reference_image", "subject_list", "subject_label")


def _clear(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()


def face_indices(case: Case) -> list[int]:
    """Sources showing a character (a face in MICo's terms): their weight is an identity similarity."""
    return [i for i, ref in enumerate(case.references)
            if ref is not None and any(p.subject.domain == "character" for p in ref.placements)]


def write_mico_bench(cases: Iterable[Case], dir: str | Path) -> Path:
    """Write the benchmark (cases of data.heldout.mico_bench_cases); returns the path of data.jsonl."""
    out = Path(dir)
    _clear(out / "sources")
    _clear(out / "references")
    data_lines, truth_lines = [], []
    for case in cases:
        inputs = []
        for i, ref in enumerate(case.references, start=1):
            rel = f"sources/{case.key}_{i}.png"
            render(ref).save(out / rel)
            inputs.append(rel)
        reference = f"references/{case.key}.png"
        render(case.target).save(out / reference)
        data_lines.append({
            "key": case.key, "category": case.meta.get("mico_group", ""), "sub_task": case.task_type,
            "composition_type": case.case_type, "instruction": case.instruction, "input_images": inputs,
            "face_indices": face_indices(case), "reference_image": reference,
            "subject_list": case.subject_list, "subject_label": case.subject_label,
        })
        truth_lines.append({"key": case.key, **case.scene_graph(), "qa": [list(p) for p in case.qa], "meta": case.meta})
    write_layout(out, data_lines, truth_lines, "MICo benchmark")
    return out / "data.jsonl"


def read_mico_bench(dir: str | Path) -> list[Case]:
    """Cases of a MICo-Bench-layout folder; meta carries category, face_indices, input_images and reference_image
    (absolute paths)."""
    root = Path(dir)
    cases = []
    for row, inputs, references, target, qa, meta in rows_with_truth(
            root, DATA_FIELDS, "MICo-Bench-layout folder (scone data build mico_bench)"):
        meta.update(input_images=inputs, reference_image=str(root / row["reference_image"]), category=row["category"],
                    face_indices=list(row["face_indices"]))
        cases.append(Case(key=str(row["key"]), task_type=row["sub_task"], case_type=row["composition_type"],
                          instruction=row["instruction"], references=references, target=target,
                          subject_list=row["subject_list"], subject_label=row["subject_label"],
                          qa=[tuple(p) for p in qa], meta=meta))
    return cases
