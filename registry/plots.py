"""Figures logged as run artifacts (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from data.formats.jsonl import ignore_bad_line, read_jsonl
from registry import LOSS_METRICS


def loss_plot(metrics_jsonl: Path, out_png: Path, title: str = "") -> Path | None:
    """The training curves of a `metrics.jsonl` (`registry.LOSS_METRICS` against step) as a PNG; None when the file
    holds none of them."""
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in LOSS_METRICS}
    for rec in read_jsonl(metrics_jsonl, ignore_bad_line):  # a file training may still be appending to
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            continue
        for k in LOSS_METRICS:
            v = rec.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                series[k].append((int(rec["step"]), float(v)))
    if not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        for k, points in series.items():
            if points:
                steps, values = zip(*sorted(points))
                ax.plot(steps, values, label=k, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title or Path(metrics_jsonl).parent.name)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png)
    finally:
        plt.close(fig)
    return out_png
