"""The held-out benchmark in the SconeEval layout.

    <dir>/data.jsonl          key, task_type, case_type, instruction, input_images (paths relative to <dir>),
                              subject_list, subject_label: the public SconeEval fields
    <dir>/images/<key>_<i>.png  input image i (1-based, as the instructions count them)
    <dir>/ground_truth.jsonl  our extension for the oracle judge: key, references, target (scene graphs), qa, meta
    <dir>/targets/<key>.png   the ground-truth target, rendered (for judge sanity checks; never a model input)

`read_bench` also reads a directory that has only data.jsonl and images (a real SconeEval download).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from data.formats.jsonl import read_jsonl
from data.records import Case
from data.render import render
from data.scene import Scene

DATA_FIELDS = ("key", "task_type", "case_type", "instruction", "input_images", "subject_list", "subject_label")


def _clear(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()


def write_bench(cases: Iterable[Case], dir: str | Path) -> Path:
    """Write the benchmark; returns the path of data.jsonl."""
    out = Path(dir)
    _clear(out / "images")
    _clear(out / "targets")
    data_lines, truth_lines = [], []
    for case in cases:
        inputs = []
        for i, ref in enumerate(case.references, start=1):
            rel = f"images/{case.key}_{i}.png"
            render(ref).save(out / rel)
            inputs.append(rel)
        render(case.target).save(out / "targets" / f"{case.key}.png")
        data_lines.append(
            {
                "key": case.key,
                "task_type": case.task_type,
                "case_type": case.case_type,
                "instruction": case.instruction,
                "input_images": inputs,
                "subject_list": case.subject_list,
                "subject_label": case.subject_label,
            }
        )
        truth_lines.append({"key": case.key, **case.scene_graph(), "qa": [list(p) for p in case.qa], "meta": case.meta})
    write_layout(out, data_lines, truth_lines, "benchmark")
    return out / "data.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_layout(out: Path, data_lines: list[dict], truth_lines: list[dict], what: str) -> None:
    """`out/data.jsonl` and `out/ground_truth.jsonl`, refusing an empty or key-duplicating benchmark (`what` names
    it in the error). Shared by the benchmark layouts built on this one."""
    if not data_lines:
        raise ValueError(f"{what} {out}: no cases to write")
    keys = [d["key"] for d in data_lines]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{what} {out}: duplicate keys")
    _write_jsonl(out / "data.jsonl", data_lines)
    _write_jsonl(out / "ground_truth.jsonl", truth_lines)


def rows_with_truth(root: Path, fields, layout: str):
    """(row, input image paths, reference scenes, target scene, qa, meta) per line of `root/data.jsonl`, joined
    with `root/ground_truth.jsonl` by key when it exists (else scenes None, qa empty); a line missing one of
    `fields` is an error naming the file, line and fields. Shared by the benchmark layouts built on this one."""
    data_path = root / "data.jsonl"
    if not data_path.exists():
        raise FileNotFoundError(f"{data_path} not found: expected a {layout}")
    truth_path = root / "ground_truth.jsonl"
    truth = {t["key"]: t for t in read_jsonl(truth_path)} if truth_path.exists() else {}
    for n, row in enumerate(read_jsonl(data_path), start=1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{data_path}:{n}: missing fields {missing}")
        gt = truth.get(row["key"])
        inputs = [str(root / p) for p in row["input_images"]]
        if gt:
            references = [Scene.from_dict(s) for s in gt["references"]]
            target = Scene.from_dict(gt["target"])
            qa, meta = gt.get("qa", []), dict(gt.get("meta", {}))
        else:
            references, target, qa, meta = [None] * len(inputs), None, [], {}
        yield row, inputs, references, target, qa, meta


def read_bench(dir: str | Path) -> list[Case]:
    """Cases of a benchmark directory; scene graphs are None when ground_truth.jsonl is absent.

    meta['input_images'] holds the absolute image paths (see `load_inputs`).
    """
    cases = []
    for row, inputs, references, target, qa, meta in rows_with_truth(Path(dir), DATA_FIELDS,
                                                                       "SconeEval-layout directory"):
        meta["input_images"] = inputs
        cases.append(
            Case(
                key=str(row["key"]),
                task_type=row["task_type"],
                case_type=row["case_type"],
                instruction=row["instruction"],
                references=references,
                target=target,
                subject_list=row["subject_list"],
                subject_label=row["subject_label"],
                qa=[tuple(p) for p in qa],
                meta=meta,
            )
        )
    return cases


def load_inputs(case: Case) -> list[Image.Image]:
    """The input images of a case read by `read_bench`, as RGB PIL images."""
    if "input_images" not in case.meta:
        raise ValueError(f"case {case.key}: no input image paths; read it with data.formats.sconeeval.read_bench")
    return [Image.open(p).convert("RGB") for p in case.meta["input_images"]]
