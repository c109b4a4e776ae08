"""Data cards: counts, image sizes, instruction lengths, contact sheet and length plot."""
import json
from pathlib import Path

from PIL import Image

from data.build import BENCH, MIGE, build_dataset
from data.card import THUMB, length_stats, write_card
from data.config import DataConfig, DatasetSizes


def test_card_of_a_built_dataset(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "artifacts" / "data"), num_workers=1, sizes=DatasetSizes(mige_edit=6, bench_per_task=1))
    build_dataset(MIGE, cfg)
    card = write_card(MIGE, cfg)
    out = tmp_path / "artifacts" / "datacards" / MIGE
    assert json.loads((out / "card.json").read_text()) == {k: v for k, v in card.items() if k != "paths"}
    assert card["rows"] == 6 and card["task_type"] == {"subject_addition": 3, "subject_replacement": 3}
    assert card["images_per_row"] == {"3": 6} and card["image_sizes"] == {"32x32": 18}
    words = card["instruction_words"]
    assert words["count"] == 6 and sum(words["histogram"].values()) == 6 and words["min"] <= words["p50"] <= words["max"]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] == 4 + 6 * (THUMB + 4) and sheet.size[0] > 3 * THUMB
    assert Image.open(out / "lengths.png").size[0] > 100
    # the benchmark layout too (inputs + rendered target)
    build_dataset(BENCH, cfg)
    bench = write_card(BENCH, cfg)
    assert bench["rows"] == 6 and sum(bench["task_type"].values()) == 6


def test_length_stats_by_hand():
    s = length_stats([3, 5, 5, 7])
    assert (s["min"], s["max"], s["mean"], s["p50"]) == (3, 7, 5.0, 5.0)
    assert s["histogram"] == {"3": 1, "5": 2, "7": 1}
    assert length_stats([]) == {"count": 0}
