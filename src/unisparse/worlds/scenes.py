"""The shapes world itself: its constants (canvas, slots, shapes and their templates, colours, number
and relation words), scenes of objects, the renderer, and GenEval's spatial-relation rule on boxes.

* Richness. Eight shapes and a twelve-step hue wheel (neighbouring colours differ by 0.5 in one
  channel) give 7,800 prompts, and the colour judge needs a generator precise to a quarter of the
  colour range (see ``worlds.shapes`` for why).
* Circle template. A 6x6 disc with single-pixel corners cut has IoU 0.89 with the square, and the
  24-pixel octagon contains the cross (IoU 0.83). To keep every pair of templates at IoU <= 0.8 the
  circle is a 28-pixel disc cut two pixels per corner along the top and bottom rows (``TEMPLATES``).
* Boxes are continuous coordinates ``(y0, x0, y1, x1)`` with exclusive ends (pixel ``i`` covers
  ``[i, i+1)``), so extents are pixel counts (6 for a full object) and centres are box centres, as
  in GenEval.
* The plural of "cross" is "crosses" (others add "s").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# ---------------------------------------------------------------------------
# World constants
# ---------------------------------------------------------------------------

CANVAS = 16
SLOT = 8  # slots are SLOT x SLOT quadrants of the canvas
OBJ = 6  # objects are OBJ x OBJ templates ...
OBJ_OFFSET = 1  # ... placed at (1, 1) inside their slot: >= 2 px gaps
N_SLOTS = 4

SHAPES = ("square", "circle", "triangle", "cross", "ring", "tee", "hook", "spool")


def _template(rows: Sequence[str]) -> np.ndarray:
    """Parse an ASCII template ('#' = on) into a read-only bool array."""
    arr = np.array([[c == "#" for c in r] for r in rows], dtype=bool)
    assert arr.shape == (OBJ, OBJ), arr.shape
    arr.setflags(write=False)
    return arr


TEMPLATES = {
    "square": _template(["######"] * 6),
    "circle": _template(["..##..", "######", "######", "######", "######", "..##.."]),
    "triangle": _template(["..##..", "..##..", ".####.", ".####.", "######", "######"]),
    "cross": _template(["..##..", "..##..", "######", "######", "..##..", "..##.."]),
    "ring": _template(["######", "#....#", "#....#", "#....#", "#....#", "######"]),
    "tee": _template(["######", "######", "..##..", "..##..", "..##..", "..##.."]),
    "hook": _template(["##....", "##....", "##....", "##....", "######", "######"]),
    "spool": _template(["######", ".####.", "..##..", "..##..", ".####.", "######"]),
}

COLOURS = {  # a twelve-step hue wheel: neighbours differ by 0.5 in one channel
    "red": (1.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "lime": (0.5, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "mint": (0.0, 1.0, 0.5),
    "cyan": (0.0, 1.0, 1.0),
    "azure": (0.0, 0.5, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "violet": (0.5, 0.0, 1.0),
    "purple": (1.0, 0.0, 1.0),
    "pink": (1.0, 0.0, 0.5),
}
DEFAULT_COLOUR = "white"
DEFAULT_RGB = (1.0, 1.0, 1.0)
# Colours the judge can report: the prompt colours plus the default one.
ALL_COLOURS = {**COLOURS, DEFAULT_COLOUR: DEFAULT_RGB}

NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")

POSITION_THRESHOLD = 0.1  # GenEval's box-size margin for relations


def article(word: str) -> str:
    """The indefinite article before ``word`` ("an orange", "a ring")."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    """English plural used in prompts and questions ("cross" -> "crosses")."""
    return shape + ("es" if shape.endswith("s") else "s")


# ---------------------------------------------------------------------------
# Scenes and rendering
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One object: a shape in a colour in one of the four slots."""

    shape: str
    colour: str
    slot: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in ALL_COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if not (isinstance(self.slot, (int, np.integer)) and 0 <= self.slot < N_SLOTS):
            raise ValueError(f"slot must be in 0..{N_SLOTS - 1}, got {self.slot!r}")


@dataclass(frozen=True)
class Scene:
    """A set of objects, stored sorted by slot so equal scenes compare equal."""

    objects: tuple = ()

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=lambda o: o.slot))
        slots = [o.slot for o in objs]
        if len(set(slots)) != len(slots):
            raise ValueError(f"at most one object per slot, got slots {slots}")
        object.__setattr__(self, "objects", objs)


def slot_origin(slot: int) -> tuple:
    """Top-left pixel (row, col) of the object template inside ``slot``."""
    return (slot // 2) * SLOT + OBJ_OFFSET, (slot % 2) * SLOT + OBJ_OFFSET


def object_bbox(obj: Obj) -> tuple:
    """Rendered box (y0, x0, y1, x1), exclusive ends, from the template's pixels."""
    r, c = slot_origin(obj.slot)
    ys, xs = np.nonzero(TEMPLATES[obj.shape])
    return (
        float(r + ys.min()),
        float(c + xs.min()),
        float(r + ys.max() + 1),
        float(c + xs.max() + 1),
    )


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: float32 [CANVAS, CANVAS, 3] in [0, 1], black background."""
    img = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
    for obj in scene.objects:
        r, c = slot_origin(obj.slot)
        patch = img[r : r + OBJ, c : c + OBJ]
        patch[TEMPLATES[obj.shape]] = ALL_COLOURS[obj.colour]
    return img


# ---------------------------------------------------------------------------
# Spatial relations (GenEval's rule)
# ---------------------------------------------------------------------------


def box_relations(offset_xy, dims_xy) -> frozenset:
    """GenEval's position rule (``relative_position`` of its evaluator), on a centre offset (x, y; y grows
    downward) and the two boxes' summed extents along each axis: each offset component is shrunk
    towards zero by 10% of the summed extents (so touching or overlapping boxes are not "left of" each
    other), then divided by the length of the *unshrunk* offset; a component beyond +-0.5 gives the
    relation. Nothing holds when every shrunk component is below 1e-3."""
    offset = np.asarray(offset_xy, dtype=np.float64)
    dims = np.asarray(dims_xy, dtype=np.float64)
    shrunk = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return frozenset()
    dx, dy = shrunk / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return frozenset(out)


def relations(box_b: Sequence[float], box_a: Sequence[float]) -> frozenset:
    """Relations that hold for B relative to A, given their boxes (y0,x0,y1,x1): ``box_relations``."""
    yb0, xb0, yb1, xb1 = box_b
    ya0, xa0, ya1, xa1 = box_a
    offset = ((xb0 + xb1 - xa0 - xa1) / 2.0, (yb0 + yb1 - ya0 - ya1) / 2.0)
    dims = ((xb1 - xb0) + (xa1 - xa0), (yb1 - yb0) + (ya1 - ya0))
    return box_relations(offset, dims)
