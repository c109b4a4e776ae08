"""Great Expectations suites for every built dataset.

Per-row facts that GX cannot compute itself (images decode at the declared size, label lists match the
subject lists) are derived in pandas first, next to a human-readable detail column; the suite then
expects their values. The report (GX result + readable summary) goes to <cfg.root>/../validation/<name>.json;
a failed suite raises DataValidationError whose message says which expectation failed, on how many
rows, with examples naming the shard file, the row and its key, and what to do about it.

Rows of Scone-S2I training datasets that fail a row check (data.quarantine: images, image count,
instruction, labels, duplicate key) are quarantined to validation/quarantine/<name>.parquet; up to
data.quality.max_quarantine_fraction of them the dataset passes (with a warning) when its clean rows pass the
suite, and the trainer skips them. Table-level failures (a missing column, no rows) fail outright.
`validate_all` validates every dataset before it fails, with one error listing them all.

The suites live in a file-backed Great Expectations project inside the validate stage's DVC output,
<cfg.root>/../validation/gx/ (`gx_project_dir`), versioned with the results: per dataset one expectation suite,
one validation definition and one Checkpoint (all named after the dataset, updated in place on every run) over
a pandas dataframe asset, and the Checkpoint's UpdateDataDocsAction renders the Data Docs site
(gx/uncommitted/data_docs/local_site/index.html, recorded as `data_docs` in <name>.json). The GX store keeps the
results of a dataset's latest validation only (its full rows and, after a quarantine, its clean rows); run ids
and timestamps inside it matter to nothing downstream (training reads validation/quarantine/ only).

Over 400 lines on purpose: the Great Expectations suites and the per-row checks GX cannot express decide quarantine
together; one module keeps their verdicts consistent.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd
from PIL import Image

from data.catalog import BENCH, MICO, MIGE, S2I_DATASETS, SRUM, T2I, UND, UND_HELDOUT, min_images_of
from data.config import DataConfig
from data.formats import scone_s2i
from data.formats.jsonl import read_jsonl
from data.layout import DATA_DOCS_SITE
from data.layout import validation_dir as _validation_dir
from data.quarantine import RowFilter, fix_hint, row_key, validation_quarantine_path, write_quarantine
from data.records import (MICO_TASK_TYPES, MIGE_TASK_TYPES, ROW_COLUMNS, T2I_TASK_TYPES, TASK_TYPES,
                          UNDERSTANDING_TASK_TYPES)
from data.scene import Scene

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no usage statistics calls from CI or laptops

BENCH_COLUMNS = ("key", "task_type", "case_type", "instruction", "input_images", "subject_list", "subject_label")
# What every dataset of a layout must have; the other columns are checked when present (imported data
# such as the released Scone-S2I-57K shards carry only these).
S2I_BASE_COLUMNS = ("image", "instruction")
BENCH_BASE_COLUMNS = ("instruction", "input_images")
TASK_TYPES_OF = {MICO: MICO_TASK_TYPES, MIGE: MIGE_TASK_TYPES, T2I: T2I_TASK_TYPES, UND: UNDERSTANDING_TASK_TYPES,
                 UND_HELDOUT: UNDERSTANDING_TASK_TYPES}
SRUM_COLUMNS = ("key", "category", "prompt", "target")
MAX_EXAMPLES = 5
SHARD, ROW = scone_s2i.SHARD_COLUMN, scone_s2i.ROW_COLUMN
THRESHOLD_KEY = "data.quality.max_quarantine_fraction"
log = logging.getLogger(__name__)


class DataValidationError(RuntimeError):
    """A dataset failed its suite; str(error) is the readable multi-line summary."""

    def __init__(self, summary: str, report: dict):
        super().__init__(summary)
        self.report = report


@lru_cache(maxsize=1)
def _gx():
    import great_expectations as gx

    return gx


GX_DATASOURCE = "scone-ops"  # one pandas data source; one dataframe asset per dataset
GX_BATCH = "all"  # the asset's batch definition: the whole dataframe handed over at run time


def validation_dir(cfg: DataConfig) -> Path:
    return _validation_dir(cfg.root)


def gx_project_dir(cfg: DataConfig) -> Path:
    """The file-backed GX project (great_expectations.yml, suites, definitions, checkpoints, Data Docs)."""
    return validation_dir(cfg) / "gx"


@dataclass
class GxProject:
    """The GX context of one validation folder, and where its stores and Data Docs lie (paths under `dir`, the
    caller's spelling of it: relative when cfg.root is)."""

    context: object
    dir: Path

    def _base(self, config: dict) -> Path:
        return self.dir / config["store_backend"]["base_directory"]

    @property
    def docs_dir(self) -> Path:
        return self._base(self.context.variables.data_docs_sites[DATA_DOCS_SITE])

    @property
    def docs_index(self) -> Path:
        return self.docs_dir / "index.html"

    @property
    def results_dir(self) -> Path:
        return self._base(self.context.variables.stores[self.context.variables.validation_results_store_name])

    def forget_results(self, name: str) -> None:
        """Drop a dataset's earlier validation results and their Data Docs pages: the project keeps the latest."""
        import shutil

        for folder in (self.results_dir / name, self.docs_dir / "validations" / name):
            shutil.rmtree(folder, ignore_errors=True)

    def batch_definition(self, name: str):
        context = self.context
        try:
            source = context.data_sources.get(GX_DATASOURCE)
        except (KeyError, ValueError, LookupError):
            source = context.data_sources.add_pandas(GX_DATASOURCE)
        try:
            asset = source.get_asset(name)
        except LookupError:
            asset = source.add_dataframe_asset(name)
        try:
            return asset.get_batch_definition(GX_BATCH)
        except (KeyError, LookupError):
            return asset.add_batch_definition_whole_dataframe(GX_BATCH)


def gx_project(cfg: DataConfig) -> GxProject:
    """Open (creating on first use) the file-backed GX project of cfg's validation folder."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx = _gx()
    root = validation_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(root))
    variables = context.variables
    bars = variables.progress_bars  # a ProgressBarsConfig once set, a dict once read back from the file
    quiet = (bars.get("globally") if isinstance(bars, dict) else getattr(bars, "globally", None)) is False
    if variables.analytics_enabled is not False or not quiet:
        variables.analytics_enabled = False  # recorded in great_expectations.yml too, not only by GX_ANALYTICS_ENABLED
        variables.progress_bars = ProgressBarsConfig(globally=False)
        variables.save()
    return GxProject(context, gx_project_dir(cfg))  # GX keeps its files in <project_root_dir>/gx


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
    fix: str = ""  # what to do about a failure, for the message
    # training datasets only: the rows as read, the row filter that quarantines, and the suite over other rows
    rows: list[dict] | None = None
    row_filter: Callable[[], RowFilter] | None = None
    rebuild: Callable[[pd.DataFrame], "Suite"] | None = None
    shard_gaps: dict[str, list[str]] = field(default_factory=dict)  # required column -> shards lacking it


def _add_flag(df: pd.DataFrame, name: str, problems: pd.Series) -> None:
    df[f"{name}_problem"] = problems
    df[name] = problems == ""


def _s2i_suite(df: pd.DataFrame, cfg: DataConfig, required=ROW_COLUMNS, task_types=TASK_TYPES, strict_size: bool = True,
               min_images: int = 2) -> Suite:
    gx = _gx()
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
    gx = _gx()
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

    gx = _gx()
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


def _read_jsonl_frame(path: Path, root: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the dataset first")
    rows = [{**r, SHARD: scone_s2i.shard_name(root, path), ROW: i} for i, r in enumerate(read_jsonl(path))]
    return pd.DataFrame(rows)


def _label_check(row: dict) -> list[str]:
    """The suite's label rule as a row check, so rows failing it are quarantined like the others."""
    if row.get("subject_list") is None or row.get("subject_label") is None:
        return []
    problem = _labels_problem(row["subject_list"], row["subject_label"])
    return [f"labels: {problem}"] if problem else []


def _shard_gaps(root: Path, name: str, required: Iterable[str]) -> dict[str, list[str]]:
    """Required columns some shard lacks: a table-level failure even when other shards have the column."""
    import pyarrow.parquet as pq

    gaps: dict[str, list[str]] = {}
    for path in scone_s2i.parquet_files(root, name):
        names = pq.read_schema(path).names
        for column in required:
            if column not in names:
                gaps.setdefault(column, []).append(scone_s2i.shard_name(root, path))
    return gaps


def _s2i_dataset(name: str, cfg: DataConfig, **suite_kwargs) -> Suite:
    """A training dataset: its suite plus what quarantining its bad rows takes."""
    root = Path(cfg.root)
    rows = list(scone_s2i.iter_rows(root, name, with_source=True))
    make = lambda df: _s2i_suite(df, cfg, **suite_kwargs)  # noqa: E731 (re-run on the clean rows)
    suite = make(pd.DataFrame(rows))
    strict = suite_kwargs.get("strict_size", True)
    suite.rows, suite.rebuild = rows, make
    suite.row_filter = lambda: RowFilter.for_config(cfg, strict_size=strict, min_images=suite_kwargs.get("min_images", 2), extra=_label_check)
    suite.shard_gaps = _shard_gaps(root, name, suite.required)
    suite.fix = fix_hint(name)
    return suite


def _suite_for(name: str, cfg: DataConfig) -> Suite:
    """Built datasets get their full suite; any other name is validated by the layout found on disk
    (an imported Scone-S2I or SconeEval directory) with that layout's base suite."""
    root = Path(cfg.root)
    if name == "mico":  # MICo has its own input limit (its five-input types)
        cfg = cfg.model_copy(update={"max_references": cfg.mico_max_references})
    if name in S2I_DATASETS:
        return _s2i_dataset(name, cfg, task_types=TASK_TYPES_OF.get(name, TASK_TYPES), min_images=min_images_of(name))
    if name == BENCH:
        suite = _bench_suite(_read_jsonl_frame(root / BENCH / "data.jsonl", root), cfg, root / BENCH)
        suite.fix = fix_hint(name)
        return suite
    if name == SRUM:
        suite = _srum_suite(_read_jsonl_frame(root / SRUM / "prompts.jsonl", root), cfg)
        suite.fix = fix_hint(name)
        return suite
    if scone_s2i.info_path(root, name).exists():
        from data.records import ALL_TASK_TYPES

        return _s2i_dataset(name, cfg, required=S2I_BASE_COLUMNS, task_types=ALL_TASK_TYPES, strict_size=False)
    if (root / name / "data.jsonl").exists():
        suite = _bench_suite(_read_jsonl_frame(root / name / "data.jsonl", root), cfg, root / name, required=BENCH_BASE_COLUMNS,
                             all_tasks=False, strict_size=False)
        suite.fix = fix_hint(name, kind="sconeeval")
        return suite
    raise FileNotFoundError(
        f"dataset {name!r} not found under {root}: neither a built dataset ({(*S2I_DATASETS, BENCH, SRUM)}) nor an "
        f"imported one (parquet_info/{name}.json or {name}/data.jsonl); build or import it first"
    )


# ------------------------------------------------------------------ running and reporting


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)  # NaN: a row without the field


def where(row: dict) -> str:
    """'<shard>, row <n> (key <k>)': which file to open and which row, for a row read with its source."""
    loc = f"{row[SHARD]}, row {_plain(row[ROW])}" if _present(row.get(SHARD)) else "row ?"
    if _present(row.get("key")):
        return f"{loc} (key {row['key']})"
    if _present(row.get("image")):  # foreign rows without a key: the digest the quarantine file records
        return f"{loc} (key {row_key(row)})"
    return loc


def _describe_failure(er, suite: Suite) -> dict:
    cfg = er.expectation_config
    column = cfg.kwargs.get("column")
    res = er.result or {}
    out = {"expectation": cfg.type, "column": column, "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")}}
    if er.exception_info and er.exception_info.get("raised_exception"):
        out["error"] = er.exception_info.get("exception_message")
    if cfg.type == "expect_column_to_exist" and column in suite.shard_gaps:
        out["shards"] = suite.shard_gaps[column]
    if "unexpected_count" in res:
        out["unexpected_count"] = res["unexpected_count"]
        out["element_count"] = res.get("element_count")
        idx = (res.get("unexpected_index_list") or [])[:MAX_EXAMPLES]
        df = suite.frame
        examples = []
        for i in idx:
            detail = df.at[i, suite.details[column]] if column in suite.details else repr(_plain(df.at[i, column]))
            examples.append(f"{where(df.loc[i].to_dict())}: {detail}")
        if not examples:
            examples = [repr(v) for v in (res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]]
        out["examples"] = examples
    elif "observed_value" in res:
        out["observed_value"] = res["observed_value"]
    return out


def _failure_lines(failures: list[dict]) -> list[str]:
    lines = []
    for f in failures:
        what = f"{f['expectation']}({f['column']})" if f["column"] else f["expectation"]
        if f["expectation"] == "expect_column_to_exist":
            shards = f" in {', '.join(f['shards'])}" if f.get("shards") else ""
            lines.append(f"  - {what}: column '{f['column']}' is missing{shards}")
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
    return lines


def _summary_text(name: str, failures: list[dict], n_expectations: int, n_rows: int) -> str:
    if not failures:
        return f"{name}: all {n_expectations} expectations passed on {n_rows} rows"
    lines = [f"{name}: validation FAILED, {len(failures)} of {n_expectations} expectations on {n_rows} rows"]
    return "\n".join(lines + _failure_lines(failures))


def run_suite(name: str, suite: Suite, project: GxProject, run_name: str = "all-rows") -> dict:
    """Validate suite.frame with the dataset's suite (updated in place) through its Checkpoint, which also
    renders the Data Docs pages of the result."""
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    gx = _gx()
    E = gx.expectations
    context = project.context
    expectations = [E.ExpectColumnToExist(column=c) for c in suite.required]
    expectations.append(E.ExpectTableRowCountToBeBetween(min_value=1))
    expectations += suite.expectations
    gx_suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=project.batch_definition(name), suite=gx_suite))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[DATA_DOCS_SITE])],
        result_format={"result_format": "COMPLETE"}))
    outcome = checkpoint.run(batch_parameters={"dataframe": suite.frame}, run_id=RunIdentifier(run_name=run_name))
    (result,) = outcome.run_results.values()
    failures = [_describe_failure(er, suite) for er in result.results if not er.success]
    # a required column missing from some shards only: pandas fills it in, so GX alone would not notice
    failures += [{"expectation": "expect_column_to_exist", "column": c, "kwargs": {}, "shards": shards}
                 for c, shards in suite.shard_gaps.items() if c in suite.frame]
    return {
        "dataset": name,
        "kind": suite.kind,
        "success": not failures,
        "rows": len(suite.frame),
        "statistics": dict(result.statistics),
        "summary": _summary_text(name, failures, len(expectations), len(suite.frame)),
        "failures": failures,
        "n_expectations": len(expectations),
        "gx_result": json.loads(json.dumps(result.to_json_dict(), default=str)),
    }


# ------------------------------------------------------------------ quarantine of training rows


def _table_level(failures: list[dict]) -> bool:
    """Failures no row removal can cure: a missing column, no rows, a missing task type..."""
    return any("unexpected_count" not in f for f in failures)


def _quarantine(name: str, suite: Suite, report: dict, cfg: DataConfig, project: GxProject) -> dict:
    """Take the rows failing a row check out, into validation/quarantine/<name>.parquet; decide on the rest."""
    qpath = validation_quarantine_path(cfg.root, name)
    if suite.row_filter is None or _table_level(report["failures"]):
        write_quarantine([], cfg, name, path=qpath)  # nothing quarantined now: an old file must not hide rows
        return report
    keep = suite.row_filter()
    clean = list(keep(suite.rows))
    # the file records the key the trainer matches on (a digest for foreign rows without one)
    bad = [({**row, "key": row_key(row)}, why) for row, why in keep.bad]
    write_quarantine(bad, cfg, name, path=qpath)
    if not bad:
        return report
    threshold = cfg.quality.max_quarantine_fraction
    fraction = len(bad) / max(keep.total, 1)
    report["quarantine"] = {
        "path": str(qpath), "rows": len(bad), "total": keep.total, "fraction": round(fraction, 6), "threshold": threshold,
        "keys": [row["key"] for row, _ in bad],
        "findings": [f"{where(row)}: {why}" for row, why in bad],
    }
    share = f"{len(bad)} of {keep.total} rows quarantined ({fraction:.1%} {'>' if fraction > threshold else '<='} {THRESHOLD_KEY}={threshold:g}) to {qpath}"
    examples = [f"      e.g. {x}" for x in report["quarantine"]["findings"][:MAX_EXAMPLES]]
    if fraction > threshold:
        report["success"] = False
        head = report["summary"] if report["failures"] else f"{name}: validation FAILED on {keep.total} rows"
        report["summary"] = "\n".join([head, f"  - quarantine: {share}", *examples])
        return report
    if report["failures"]:  # every failure may be one of the quarantined rows: the clean rows must pass on their own
        clean_suite = suite.rebuild(pd.DataFrame(clean))
        clean_report = run_suite(name, clean_suite, project, run_name="clean-rows")
        report["raw_failures"], report["failures"] = report["failures"], clean_report["failures"]
        report["success"] = clean_report["success"]
    warning = f"WARNING: {share}; training skips them"
    report["warnings"] = [warning]
    if report["success"]:
        head = f"{name}: validation passed on the {len(clean)} clean rows ({report['n_expectations']} expectations)"
    else:
        head = (f"{name}: validation FAILED on the clean rows, {len(report['failures'])} of {report['n_expectations']} "
                f"expectations\n" + "\n".join(_failure_lines(report["failures"])))
    report["summary"] = "\n".join([head, f"  {warning}", *examples])
    log.warning("%s: %s", name, warning)
    return report


# ------------------------------------------------------------------ entry points


# The datasets validate as mapped tasks side by side (threads): reading the rows and checking images, labels and
# scenes is each dataset's own work, but they share one file-backed GX project (great_expectations.yml, the
# stores, Data Docs), which GX does not guard against concurrent writers; its part runs under this lock.
_GX_LOCK = threading.Lock()


def validate_dataset(name: str, cfg: DataConfig) -> dict:
    """Run the dataset's suite through its GX Checkpoint (Data Docs included), quarantine a training dataset's bad
    rows, write validation/<name>.json; raise DataValidationError when it fails."""
    started = time.perf_counter()
    try:
        suite, missing = _suite_for(name, cfg), None
    except FileNotFoundError as e:
        suite, missing = None, e
    with _GX_LOCK:
        project = gx_project(cfg)
        project.forget_results(name)
        if suite is None:
            report = {"dataset": name, "success": False, "summary": f"{name}: validation FAILED, {missing}",
                      "failures": []}
            project.context.build_data_docs(site_names=[DATA_DOCS_SITE])  # the index must not list a forgotten result
        else:
            report = _quarantine(name, suite, run_suite(name, suite, project), cfg, project)
            if not report["success"]:
                report["summary"] += f"\n  fix: {suite.fix}"
        if project.docs_index.exists():
            report["data_docs"] = str(project.docs_index)
    report["seconds"] = round(time.perf_counter() - started, 3)
    out = validation_dir(cfg) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    report["report_path"] = str(out)
    if not report["success"]:
        raise DataValidationError(report["summary"] + f"\n  (full report: {out})", report)
    return report


def validate_all(names: Iterable[str], step: Callable[[str], dict] | None = None, *,
                 results: Iterable[Callable[[], dict]] | None = None) -> list[dict]:
    """Every dataset's validation, even after one fails; then one DataValidationError listing every failed dataset
    (its report: {"datasets": {name: report}}). Either `step(name)` per name, one after another, or `results`:
    one callable per name giving its outcome (e.g. the `.result` of mapped Prefect task runs already started)."""
    if (step is None) == (results is None):
        raise TypeError("validate_all takes a step or results, not both")
    outcomes = results if results is not None else [lambda name=name: step(name) for name in names]
    done, failed = [], []
    for outcome in outcomes:
        try:
            done.append(outcome())
        except DataValidationError as e:
            failed.append(e)
    if failed:
        total = len(done) + len(failed)
        text = "\n".join([f"validation FAILED for {len(failed)} of {total} datasets:", *(str(e) for e in failed)])
        raise DataValidationError(text, {"datasets": {e.report.get("dataset"): e.report for e in failed}, "passed": done})
    return done
