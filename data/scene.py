"""Scene graphs of the procedural subject world: the exact ground truth behind every image.

Shared vocabulary (palette, categories, scenes) lives here so the renderer (data.render), the
instruction writer and the pixel-level oracle judge (evaluation) agree on every colour and name.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

# Distinct, saturated colours: the oracle judge separates subjects by colour, so no two are close.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
    "pink": (240, 120, 190),
    "cyan": (40, 200, 210),
}
OBJECT_CATEGORIES = ("circle", "square", "triangle", "diamond")
CHARACTER_CATEGORIES = ("person", "robot")
TEXTURES = ("plain", "striped", "dotted")
SIZES = ("small", "large")
# Scenes: (sky, ground) colours, all muted so that no subject colour is confused with a background.
SCENES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "beach": ((170, 200, 225), (205, 190, 150)),
    "forest": ((150, 175, 150), (80, 105, 75)),
    "city": ((165, 165, 175), (105, 105, 110)),
    "night": ((45, 50, 80), (70, 70, 90)),
    "snow": ((200, 205, 215), (235, 235, 240)),
}
Domain = Literal["character", "object"]


@dataclass(frozen=True)
class Subject:
    uid: str  # unique instance id: the held-out benchmark shares none with training data
    domain: Domain
    category: str  # shape for objects, kind for characters
    colour: str
    texture: str = "plain"
    size: str = "large"

    @property
    def name(self) -> str:
        """Short attribute name, e.g. 'striped red circle'."""
        tex = "" if self.texture == "plain" else f"{self.texture} "
        return f"{tex}{self.colour} {self.category}"


@dataclass(frozen=True)
class Placement:
    subject: Subject
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class Scene:
    background: str
    placements: tuple[Placement, ...] = field(default_factory=tuple)
    size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(
            background=d["background"],
            placements=tuple(
                Placement(subject=Subject(**p["subject"]), bbox=tuple(p["bbox"])) for p in d.get("placements", ())
            ),
            size=int(d.get("size", 32)),
        )

    @classmethod
    def from_json(cls, s: str) -> "Scene":
        return cls.from_dict(json.loads(s))

    @property
    def subjects(self) -> list[Subject]:
        return [p.subject for p in self.placements]
