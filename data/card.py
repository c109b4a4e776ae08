"""Data cards: what a dataset holds, at a glance.

`<root>/../datacards/<name>/card.json`: rows, counts per task_type and case_type, image sizes, instruction
length distribution (words); `contact_sheet.png`: the first rows as reference strips ending in the
target; `lengths.png`: the instruction-length histogram.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.config import DataConfig
from data.formats import scone_s2i
from data.formats.jsonl import read_jsonl
from data.layout import CARD, CONTACT_SHEET, datacards_dir

SHEET_ROWS = 6
THUMB = 64
GAP = 4


def card_dir(cfg: DataConfig, name: str) -> Path:
    return datacards_dir(cfg.root) / name


def _rows(name: str, cfg: DataConfig) -> list[dict]:
    """Rows with `instruction`, optional task_type/case_type, and `images` (encoded bytes, target last if any)."""
    root = Path(cfg.root)
    if scone_s2i.info_path(root, name).exists():
        return [
            {"instruction": r.get("instruction"), "task_type": r.get("task_type"), "case_type": r.get("case_type"),
             "images": list(r.get("image") or []), "has_target": True}
            for r in scone_s2i.iter_rows(root, name)
        ]
    bench = root / name / "data.jsonl"
    if bench.exists():
        out = []
        for r in read_jsonl(bench):
            images = [(root / name / p).read_bytes() for p in r.get("input_images", [])]
            target = root / name / "targets" / f"{r.get('key')}.png"
            out.append({"instruction": r.get("instruction"), "task_type": r.get("task_type"), "case_type": r.get("case_type"),
                        "images": images + ([target.read_bytes()] if target.exists() else []), "has_target": target.exists()})
        return out
    prompts = root / name / "prompts.jsonl"
    if prompts.exists():
        return [{"instruction": r["prompt"], "task_type": r.get("category"), "case_type": None, "images": [], "has_target": False}
                for r in read_jsonl(prompts)]
    raise FileNotFoundError(f"dataset {name!r} not found under {root}; build or import it first")


def _decode(data: bytes) -> Image.Image | None:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception:  # a broken image shows as a grey tile, the card still gets written
        return None


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"count": 0}
    a = np.asarray(lengths)
    hist = Counter(lengths)
    return {
        "count": int(a.size), "min": int(a.min()), "max": int(a.max()), "mean": round(float(a.mean()), 3),
        "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
        "histogram": {str(k): hist[k] for k in sorted(hist)},
    }


def contact_sheet(rows: list[dict], n: int = SHEET_ROWS) -> Image.Image:
    """One strip per row: references, an arrow, the target (grey tile for an image that does not decode)."""
    rows = [r for r in rows if r["images"]][:n]
    width = max((len(r["images"]) for r in rows), default=1)
    sheet = Image.new("RGB", (GAP + width * (THUMB + GAP) + 2 * GAP, GAP + max(len(rows), 1) * (THUMB + GAP)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        y = GAP + i * (THUMB + GAP)
        x = GAP
        for j, data in enumerate(r["images"]):
            is_target = r["has_target"] and j == len(r["images"]) - 1
            if is_target:
                draw.line((x, y + THUMB // 2, x + GAP, y + THUMB // 2), fill=(0, 0, 0))
                x += 2 * GAP
            img = _decode(data)
            tile = img.resize((THUMB, THUMB), Image.NEAREST) if img else Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
            sheet.paste(tile, (x, y))
            if is_target:
                draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), outline=(0, 0, 0))
            x += THUMB + GAP
    return sheet


def _lengths_plot(lengths: list[int], name: str, path: Path) -> None:
    # a Figure of its own, not pyplot's global state: the validations run as mapped tasks in threads
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), dpi=80)
    ax = fig.subplots()
    if lengths:
        ax.hist(lengths, bins=range(min(lengths), max(lengths) + 2), color="#4a78c2", edgecolor="white")
    ax.set_xlabel("instruction length (words)")
    ax.set_ylabel("rows")
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path)


def write_card(name: str, cfg: DataConfig) -> dict:
    """Write the data card of a built or imported dataset; returns card.json's content (plus its paths)."""
    rows = _rows(name, cfg)
    out = card_dir(cfg, name)
    out.mkdir(parents=True, exist_ok=True)
    sizes: Counter = Counter()
    image_counts: Counter = Counter()
    for r in rows:
        image_counts[len(r["images"])] += 1
        for data in r["images"]:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    sizes[f"{img.size[0]}x{img.size[1]}"] += 1
            except Exception:
                sizes["undecodable"] += 1
    lengths = [len(r["instruction"].split()) for r in rows if isinstance(r["instruction"], str)]
    card = {
        "name": name,
        "rows": len(rows),
        "task_type": dict(sorted(Counter(r["task_type"] or "unknown" for r in rows).items())),
        "case_type": dict(sorted(Counter(r["case_type"] or "unknown" for r in rows).items())),
        "images_per_row": {str(k): image_counts[k] for k in sorted(image_counts)},
        "image_sizes": dict(sorted(sizes.items())),
        "instruction_words": length_stats(lengths),
    }
    (out / CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    contact_sheet(rows).save(out / CONTACT_SHEET)
    _lengths_plot(lengths, name, out / "lengths.png")
    return card | {"paths": {k: str(out / f) for k, f in (("card", CARD), ("contact_sheet", CONTACT_SHEET), ("lengths", "lengths.png"))}}
