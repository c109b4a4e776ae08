"""Compositional text-to-image prompts for SRUM rounds, in T2I-CompBench-style categories.

Rows of <root>/srum_prompts/prompts.jsonl: {key, category, prompt, target, layout_specified}. `target` is the
scene graph of an image that satisfies the prompt exactly; when `layout_specified` is false the prompt
says nothing about positions, so a judge must not hold the target's layout against a candidate.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data.formats.jsonl import iter_jsonl
from data.instructions import T2I_COMPANIONS, T2I_RELATIONS, TARGET_POSITION_PHRASES, counted, describe, t2i_prompt
from data.scene import CHARACTER_CATEGORIES, OBJECT_CATEGORIES, SCENES, TEXTURES, Scene
from data.world import LAYOUTS, ROW_LAYOUT, Exhausted, World, layout_scene

CATEGORIES = ("colour", "shape", "texture", "spatial", "numeracy", "non-spatial", "complex")


def _prompt(world: World, category: str) -> tuple[str, Scene, bool]:
    used: set[str] = set()

    def draw(**kw):
        s = world.subject(used, **kw)
        used.add(s.colour)
        return s

    def restyle(s, **changes):
        return dataclasses.replace(s, **changes)

    size = world.image_size
    background = world.pick(list(SCENES))
    layout_specified = False
    if category == "colour":  # same shape, different colours: colour binding
        a = draw(exclude_categories=set(CHARACTER_CATEGORIES), textures=("plain",))
        b = draw(category=a.category, textures=("plain",))
        subjects, text = [a, b], f"{describe(a)} and {describe(b)}"
        layout, slots = "pair", ["left", "right"]
    elif category == "shape":
        a = draw(exclude_categories=set(CHARACTER_CATEGORIES), textures=("plain",))
        b = draw(exclude_categories={a.category, *CHARACTER_CATEGORIES}, textures=("plain",))
        subjects, text = [a, b], f"{describe(a)} and {describe(b)}"
        layout, slots = "pair", ["left", "right"]
    elif category == "texture":
        marked = tuple(t for t in TEXTURES if t != "plain")
        a, b = draw(textures=marked), draw(textures=marked)
        subjects, text = [a, b], f"{describe(a)} and {describe(b)}"
        layout, slots = "pair", ["left", "right"]
    elif category == "spatial":
        a, b = draw(), draw()
        relation = world.pick(list(T2I_RELATIONS))
        slot_a, slot_b = T2I_RELATIONS[relation]
        subjects, text = [a, b], f"{describe(a)} {relation} {describe(b)}"
        layout, slots = ("pair" if slot_a in LAYOUTS["pair"] else "column"), [slot_a, slot_b]
        layout_specified = True
    elif category == "numeracy":
        n = int(world.rng.integers(2, 5))
        a = draw()
        if n == 3:  # three large subjects in a row overlap; counting needs them apart
            a = restyle(a, size="small")
        subjects = [restyle(a, uid=f"{a.uid}-{k}") for k in range(n)]
        text = counted(a, n)
        layout = ROW_LAYOUT[n]
        slots = list(LAYOUTS[layout])
    elif category == "non-spatial":
        a = draw(exclude_categories=set(OBJECT_CATEGORIES))
        b = draw(exclude_categories=set(CHARACTER_CATEGORIES))
        subjects, text = [a, b], f"{describe(a)} {world.pick(T2I_COMPANIONS)} {describe(b)}"
        layout, slots = "pair", ["left", "right"]
    elif category == "complex":
        subjects = [draw() for _ in range(3)]
        layout = "triple"
        slots = world.permutation(list(LAYOUTS[layout]))
        parts = [f"{describe(s)} {TARGET_POSITION_PHRASES[slot]}" for s, slot in zip(subjects, slots)]
        text = " , ".join(parts[:-1]) + " and " + parts[-1]
        layout_specified = True
    else:
        raise ValueError(f"unknown SRUM prompt category {category!r}; expected one of {CATEGORIES}")
    target = layout_scene(background, subjects, slots, layout, size)
    return t2i_prompt(text, background, int(world.rng.integers(2))), target, layout_specified


def make_prompts(world: World, n: int) -> list[dict]:
    """n prompts, categories in turn."""
    rows = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        for _ in range(100):
            try:
                prompt, target, specified = _prompt(world, category)
                break
            except Exhausted:
                continue
        else:
            raise RuntimeError(f"could not draw a {category} prompt")
        rows.append(
            {"key": f"srum_{i:05d}", "category": category, "prompt": prompt, "target": target.to_dict(), "layout_specified": specified}
        )
    return rows


def write_prompts(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def read_prompts(path: str | Path) -> list[dict]:
    """Rows with `target` parsed into a Scene."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build it with data.build.build_dataset('srum_prompts', cfg)")
    rows = []
    for n, row in iter_jsonl(path):
        try:
            row["target"] = Scene.from_dict(row["target"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: malformed prompt row ({e})") from None
        rows.append(row)
    return rows

