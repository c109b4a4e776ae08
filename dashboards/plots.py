"""PNG charts for the report. Uses matplotlib's object API (Figure + Agg canvas), so no global backend or pyplot
state is touched: safe inside Prefect workers and test processes that never open a display.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Series = Sequence[tuple[int, float]]  # (step, value)


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def plot_curves(series: Mapping[str, Series], title: str, out: Path, ylabel: str = "loss") -> Path:
    """One line per metric over training steps; empty series are left out of the legend."""
    fig = Figure(figsize=(5.0, 3.0))
    ax = fig.add_subplot()
    for name, points in series.items():
        if not points:
            continue
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, label=name, linewidth=1.2, marker="." if len(points) < 30 else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_overall(labels: Sequence[str], values: Sequence[float | None], references: Mapping[str, float],
                 out: Path, title: str = "SconeEval Overall per checkpoint") -> Path:
    """Bars for our checkpoints (missing scores drawn as empty slots), dashed lines for the papers' models."""
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 2.0), 3.2))
    ax = fig.add_subplot()
    xs = range(len(labels))
    ax.bar(xs, [v if v is not None else 0.0 for v in values], color="#4c78a8")
    for x, v in zip(xs, values):
        ax.text(x, (v or 0.0) + 0.1, f"{v:.2f}" if v is not None else "not run", ha="center", fontsize=7)
    colours = ["#e45756", "#54a24b", "#b279a2", "#f58518"]
    for i, (name, value) in enumerate(references.items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=colours[i % len(colours)], label=f"{name} {value:.2f}")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 11)  # headroom for the legend above the 0-10 scale
    ax.set_ylabel("Overall (0-10)")
    ax.set_title(title, fontsize=10)
    if references:
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    return _save(fig, out)


def plot_ablation(labels: Sequence[str], panels: Mapping[str, Sequence[tuple[float, float]]], out: Path,
                  title: str, baseline: Mapping[str, float] | None = None) -> Path:
    """One panel per metric: a bar per variant at its mean with the seeds' std as error bar; a dashed line for
    the starting checkpoint when given."""
    fig = Figure(figsize=(4.2 * len(panels), 0.35 * len(labels) + 1.6))
    for i, (metric, values) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ys = range(len(labels))
        ax.barh(ys, [m for m, _ in values], xerr=[s for _, s in values], color="#4c78a8", capsize=2)
        if baseline and metric in baseline:
            ax.axvline(baseline[metric], linestyle="--", linewidth=1, color="#e45756", label=f"start {baseline[metric]:.3f}")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_yticks(list(ys), labels if i == 0 else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)
