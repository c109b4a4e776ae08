"""Great Expectations suites for every built dataset.

Per-row facts that GX cannot compute itself (images decode at the declared size, label lists match the
subject lists) are derived in pandas first, next to a human-readable detail column; the suite then
expects their values. The report (GX result + readable summary) goes to <cfg.root>/../validation/<name>.json;
a failed suite raises DataValidationError whose message says which expectation failed, on how many
rows, with example keys and details.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
from PIL import Image

from data.build import BENCH, MICO, MIGE, S2I_DATASETS, SRUM, T2I, min_images_of
from data.config import DataConfig
from data.formats import scone_s2i
from data.formats.jsonl import read_jsonl
from data.records import MICO_TASK_TYPES, MIGE_TASK_TYPES, ROW_COLUMNS, T2I_TASK_TYPES, TASK_TYPES
from data.scene import Scene

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no usage statistics calls from CI or laptops

BENCH_COLUMNS = ("key", "task_type", "case_type", "instruction", "input_images", "subject_list", "subject_label")
# What every dataset of a layout must have; the other columns are checked when present (imported data
# such as the released Scone-S2I-57K shards carry only these).
S2I_BASE_COLUMNS = ("image", "instruction")
BENCH_BASE_COLUMNS = ("instruction", "input_images")
TASK_TYPES_OF = {MICO: MICO_TASK_TYPES, MIGE: MIGE_TASK_TYPES, T2I: T2I_TASK_TYPES}
SRUM_COLUMNS = ("key", "category", "prompt", "target")
MAX_EXAMPLES = 5


class DataValidationError(RuntimeError):
    """A dataset failed its suite; str(error) is the readable multi-line summary."""

    def __init__(self, summary: str, report: dict):
        super().__init__(summary)
        self.report = report


@lru_cache(maxsize=1)
def _gx():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return gx, context


_run_ids = itertools.count()


def validation_dir(cfg: DataConfig) -> Path:
    return Path(cfg.root).parent / "validation"


# ------------------------------------------------------------------ derived per-row facts


def _image_problem(data, image_size: int | None) -> str:
    """'' when `data` (PNG bytes or a path) decodes to an RGB image_size x image_size image (None: decodes at all)."""
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        img.load()
    except Exception as e:  # any decoder failure is the finding itself
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        return f"does not decode ({type(e).__name__}: {reason})"
    if image_size is not None and (img.mode != "RGB" or img.size != (image_size, image_size)):
        return f"is {img.size[0]}x{img.size[1]} {img.mode}, expected {image_size}x{image_size} RGB"
    return ""


def _images_problem(images, image_size: int | None) -> str:
    if images is None or isinstance(images, float):
        return "no images"
    problems = [f"image {i + 1} {p}" for i, data in enumerate(images) if (p := _image_problem(data, image_size))]
    return "; ".join(problems)


def _loads(value):
    return json.loads(value) if isinstance(value, str) else value


def _labels_problem(subject_list, subject_label) -> str:
    """'' when labels mirror the subject lists, are 0/1, and each reference with candidates has exactly one 1."""
    try:
        phrases, labels = _loads(subject_list), _loads(subject_label)
    except (TypeError, json.JSONDecodeError) as e:
        return f"not JSON ({e})"
    if not isinstance(phrases, list) or not isinstance(labels, list):
        return "subject_list and subject_label must be lists of lists"
    if len(phrases) != len(labels):
        return f"{len(phrases)} subject lists but {len(labels)} label lists"
    for i, (p, lab) in enumerate(zip(phrases, labels), start=1):
        if len(p) != len(lab):
            return f"reference {i}: {len(p)} phrases but {len(lab)} labels"
        if any(x not in (0, 1) for x in lab):
            return f"reference {i}: labels {lab} are not all 0/1"
        if p and sum(lab) != 1:
            return f"reference {i}: {sum(lab)} candidates labelled 1, expected exactly one"
    return ""


def _scene_problem(value) -> str:
    try:
        scene = Scene.from_dict(_loads(value))
    except Exception as e:
        return f"not a scene graph ({type(e).__name__}: {e})"
    return "" if scene.placements else "target has no subjects"


# ------------------------------------------------------------------ frames and suites per dataset kind


@dataclass
class Suite:
    kind: str
    frame: pd.DataFrame
    required: tuple[str, ...]
    expectations: list  # gx expectation objects (only on columns that exist)
    details: dict[str, str]  # derived column -> its detail column


def _add_flag(df: pd.DataFrame, name: str, problems: pd.Series) -> None:
    df[f"{name}_problem"] = problems
    df[name] = problems == ""


def _s2i_suite(df: pd.DataFrame, cfg: DataConfig, required=ROW_COLUMNS, task_types=TASK_TYPES, strict_size: bool = True,
               min_images: int = 2) -> Suite:
    gx, _ = _gx()
    E = gx.expectations
    exp, details = [], {}
    if "image" in df:
        df["n_images"] = df["image"].map(lambda x: 0 if x is None else len(x))
        size = cfg.image_size if strict_size else None
        _add_flag(df, "images_ok", df["image"].map(lambda x: _images_problem(x, size)))
        exp += [
            E.ExpectColumnValuesToBeBetween(column="n_images", min_value=min_images, max_value=cfg.max_references + 1),
            E.ExpectColumnValuesToBeInSet(column="images_ok", value_set=[True]),
        ]
        details["images_ok"] = "images_ok_problem"
    if "subject_list" in df and "subject_label" in df:
        _add_flag(df, "labels_ok", pd.Series([_labels_problem(a, b) for a, b in zip(df["subject_list"], df["subject_label"])], index=df.index))
        exp.append(E.ExpectColumnValuesToBeInSet(column="labels_ok", value_set=[True]))
        details["labels_ok"] = "labels_ok_problem"
    for col in ("scene_graph", "qa", "meta"):
        if col in df:
            exp.append(E.ExpectColumnValuesToBeJsonParseable(column=col))
    return Suite("scone_s2i", df, tuple(required), exp + _common(df, E, task_types), details)


def _bench_suite(df: pd.DataFrame, cfg: DataConfig, bench_dir: Path, required=BENCH_COLUMNS, all_tasks: bool = True, strict_size: bool = True) -> Suite:
    gx, _ = _gx()
    E = gx.expectations
    exp, details = [], {}
    if "input_images" in df:
        df["n_images"] = df["input_images"].map(lambda x: len(x) if isinstance(x, list) else 0)
        paths = df["input_images"].map(lambda x: [bench_dir / p for p in x] if isinstance(x, list) else None)
        size = cfg.image_size if strict_size else None
        _add_flag(df, "images_ok", paths.map(lambda x: _images_problem(x, size)))
        exp += [
            E.ExpectColumnValuesToBeBetween(column="n_images", min_value=1, max_value=cfg.max_references),
            E.ExpectColumnValuesToBeInSet(column="images_ok", value_set=[True]),
        ]
        details["images_ok"] = "images_ok_problem"
    if "subject_list" in df and "subject_label" in df:
        _add_flag(df, "labels_ok", pd.Series([_labels_problem(a, b) for a, b in zip(df["subject_list"], df["subject_label"])], index=df.index))
        exp.append(E.ExpectColumnValuesToBeInSet(column="labels_ok", value_set=[True]))
        details["labels_ok"] = "labels_ok_problem"
    if "task_type" in df and all_tasks:  # the built benchmark covers all six SconeEval sub-tasks
        exp.append(E.ExpectColumnDistinctValuesToContainSet(column="task_type", value_set=list(TASK_TYPES)))
    return Suite("sconeeval", df, tuple(required), exp + _common(df, E), details)


def _srum_suite(df: pd.DataFrame, cfg: DataConfig) -> Suite:
    from data.formats.srum_prompts import CATEGORIES

    gx, _ = _gx()
    E = gx.expectations
    exp, details = [], {}
    if "target" in df:
        _add_flag(df, "target_ok", df["target"].map(_scene_problem))
        exp.append(E.ExpectColumnValuesToBeInSet(column="target_ok", value_set=[True]))
        details["target_ok"] = "target_ok_problem"
    if "category" in df:
        exp.append(E.ExpectColumnValuesToBeInSet(column="category", value_set=list(CATEGORIES)))
    if "prompt" in df:
        exp += [
            E.ExpectColumnValuesToNotBeNull(column="prompt"),
            E.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1),
        ]
    if "key" in df:
        exp.append(E.ExpectColumnValuesToBeUnique(column="key"))
    return Suite("srum_prompts", df, SRUM_COLUMNS, exp, details)


def _common(df: pd.DataFrame, E, task_types=TASK_TYPES) -> list:
    exp = []
    if "instruction" in df:
        exp += [
            E.ExpectColumnValuesToNotBeNull(column="instruction"),
            E.ExpectColumnValueLengthsToBeBetween(column="instruction", min_value=1),
        ]
    if "key" in df:
        exp.append(E.ExpectColumnValuesToBeUnique(column="key"))
    if "task_type" in df:
        exp.append(E.ExpectColumnValuesToBeInSet(column="task_type", value_set=list(task_types)))
    return exp


def _read_jsonl_frame(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the dataset first")
    return pd.DataFrame(read_jsonl(path))


def _suite_for(name: str, cfg: DataConfig) -> Suite:
    """Built datasets get their full suite; any other name is validated by the layout found on disk
    (an imported Scone-S2I or SconeEval directory) with that layout's base suite."""
    root = Path(cfg.root)
    if name == "mico":  # MICo has its own input limit (its five-input types)
        cfg = cfg.model_copy(update={"max_references": cfg.mico_max_references})
    if name in S2I_DATASETS:
        return _s2i_suite(pd.DataFrame(list(scone_s2i.iter_rows(root, name))), cfg, task_types=TASK_TYPES_OF.get(name, TASK_TYPES),
                          min_images=min_images_of(name))
    if name == BENCH:
        return _bench_suite(_read_jsonl_frame(root / BENCH / "data.jsonl"), cfg, root / BENCH)
    if name == SRUM:
        return _srum_suite(_read_jsonl_frame(root / SRUM / "prompts.jsonl"), cfg)
    if scone_s2i.info_path(root, name).exists():
        from data.records import ALL_TASK_TYPES

        df = pd.DataFrame(list(scone_s2i.iter_rows(root, name)))
        return _s2i_suite(df, cfg, required=S2I_BASE_COLUMNS, task_types=ALL_TASK_TYPES, strict_size=False)
    if (root / name / "data.jsonl").exists():
        return _bench_suite(_read_jsonl_frame(root / name / "data.jsonl"), cfg, root / name, required=BENCH_BASE_COLUMNS, all_tasks=False, strict_size=False)
    raise FileNotFoundError(
        f"dataset {name!r} not found under {root}: neither a built dataset ({(*S2I_DATASETS, BENCH, SRUM)}) nor an "
        f"imported one (parquet_info/{name}.json or {name}/data.jsonl); build or import it first"
    )


# ------------------------------------------------------------------ running and reporting


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _describe_failure(er, suite: Suite) -> dict:
    cfg = er.expectation_config
    column = cfg.kwargs.get("column")
    res = er.result or {}
    out = {"expectation": cfg.type, "column": column, "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")}}
    if er.exception_info and er.exception_info.get("raised_exception"):
        out["error"] = er.exception_info.get("exception_message")
    if "unexpected_count" in res:
        out["unexpected_count"] = res["unexpected_count"]
        out["element_count"] = res.get("element_count")
        idx = (res.get("unexpected_index_list") or [])[:MAX_EXAMPLES]
        df = suite.frame
        examples = []
        for i in idx:
            key = df.at[i, "key"] if "key" in df else f"row {i}"
            detail = df.at[i, suite.details[column]] if column in suite.details else repr(_plain(df.at[i, column]))
            examples.append(f"{key}: {detail}")
        if not examples:
            examples = [repr(v) for v in (res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]]
        out["examples"] = examples
    elif "observed_value" in res:
        out["observed_value"] = res["observed_value"]
    return out


def _summary_text(name: str, failures: list[dict], n_expectations: int, n_rows: int) -> str:
    if not failures:
        return f"{name}: all {n_expectations} expectations passed on {n_rows} rows"
    lines = [f"{name}: validation FAILED, {len(failures)} of {n_expectations} expectations on {n_rows} rows"]
    for f in failures:
        what = f"{f['expectation']}({f['column']})" if f["column"] else f["expectation"]
        if f["expectation"] == "expect_column_to_exist":
            lines.append(f"  - {what}: column '{f['column']}' is missing")
            continue
        if "unexpected_count" in f:
            bounds = ", ".join(f"{k}={v:g}" for k, v in f["kwargs"].items() if k in ("min_value", "max_value") and v is not None)
            expected = f" (expected {bounds})" if bounds else ""
            lines.append(f"  - {what}: {f['unexpected_count']} of {f['element_count']} rows fail{expected}")
        elif "observed_value" in f:
            lines.append(f"  - {what}: observed {f['observed_value']} {f['kwargs']}")
        else:
            lines.append(f"  - {what}: failed {f['kwargs']}")
        if f.get("error"):
            lines.append(f"      error: {f['error']}")
        for ex in f.get("examples", []):
            lines.append(f"      e.g. {ex}")
    return "\n".join(lines)


def run_suite(name: str, suite: Suite) -> dict:
    gx, context = _gx()
    E = gx.expectations
    n = next(_run_ids)
    expectations = [E.ExpectColumnToExist(column=c) for c in suite.required]
    expectations.append(E.ExpectTableRowCountToBeBetween(min_value=1))
    expectations += suite.expectations
    gx_suite = context.suites.add(gx.ExpectationSuite(name=f"{name}-{n}", expectations=expectations))
    batch = context.data_sources.add_pandas(f"{name}-{n}").add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"{name}-{n}", data=batch, suite=gx_suite))
    result = definition.run(batch_parameters={"dataframe": suite.frame}, result_format={"result_format": "COMPLETE"})
    failures = [_describe_failure(er, suite) for er in result.results if not er.success]
    return {
        "dataset": name,
        "kind": suite.kind,
        "success": bool(result.success),
        "rows": len(suite.frame),
        "statistics": dict(result.statistics),
        "summary": _summary_text(name, failures, len(expectations), len(suite.frame)),
        "failures": failures,
        "gx_result": json.loads(json.dumps(result.to_json_dict(), default=str)),
    }


def validate_dataset(name: str, cfg: DataConfig) -> dict:
    """Run the dataset's suite, write validation/<name>.json; raise DataValidationError when it fails."""
    started = time.perf_counter()
    try:
        suite = _suite_for(name, cfg)
    except FileNotFoundError as e:
        report = {"dataset": name, "success": False, "summary": f"{name}: validation FAILED, {e}", "failures": []}
    else:
        report = run_suite(name, suite)
    report["seconds"] = round(time.perf_counter() - started, 3)
    out = validation_dir(cfg) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    report["report_path"] = str(out)
    if not report["success"]:
        raise DataValidationError(report["summary"] + f"\n  (full report: {out})", report)
    return report
