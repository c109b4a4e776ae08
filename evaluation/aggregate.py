"""`scone eval aggregate`: a results tree of either benchmark (evaluation.results layout) into its summary JSON and
its table. Above both benchmark modules, so neither imports the other."""
from __future__ import annotations

from pathlib import Path

from evaluation.omnicontext import aggregate_omnicontext, format_omnicontext_table
from evaluation.sconeeval import aggregate, format_table3, summary_json

BENCHMARKS = ("sconeeval", "omnicontext", "mico", "mige")


def aggregate_command(results_dir: str | Path, model: str | None, benchmark: str = "sconeeval",
                      out: str | Path | None = None) -> str:
    """Aggregate a results tree, write the summary JSON to `out` (a file path) and return the table (Table 3 layout
    for SconeEval, Table 2 for OmniContext and MICo-Bench, MIGE-Bench's per edit type) as markdown.

    MICo-Bench and MIGE-Bench results are one folder per model (evaluation.mico, evaluation.migebench layouts):
    `results_dir/model`, or `results_dir` itself when model is None."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: use one of {', '.join(BENCHMARKS)}")
    if model is None and benchmark not in ("mico", "mige"):
        raise ValueError(f"--benchmark {benchmark} reads <results-dir>/<model>/score_try*/: give --model")
    if benchmark in ("mico", "mige"):
        folder = Path(results_dir) / model if model is not None else Path(results_dir)
        if benchmark == "mico":
            from evaluation.mico import aggregate_mico, format_mico_table

            summary = aggregate_mico(folder)
            table = format_mico_table(summary)
            if summary["missing_categories"]:
                table += f"\n\n(missing task groups: {', '.join(summary['missing_categories'])}; Overall over those present)"
        else:
            from evaluation.migebench import aggregate_mige, format_mige_table

            summary = aggregate_mige(folder)
            table = format_mige_table(summary)
            if summary["missing_edit_types"]:
                table += f"\n\n(missing edit types: {', '.join(summary['missing_edit_types'])})"
    elif benchmark == "sconeeval":
        summary = aggregate(results_dir, model)
        table = format_table3(summary, style="markdown", with_std=True)
        if summary["missing_task_types"]:
            table += f"\n\n(missing task types: {', '.join(summary['missing_task_types'])}; averages over those present)"
    else:
        summary = aggregate_omnicontext(results_dir, model)
        table = format_omnicontext_table(summary, with_std=True)
    summary["benchmark"] = benchmark
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(summary_json(summary))
    return table
