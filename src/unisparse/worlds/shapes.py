"""Shapes world: a tiny, deterministic stand-in for multimodal benchmarks.

Why this exists: the project trains (and prunes) a tiny multimodal model on
CPU, where real benchmarks (GenEval for text-to-image, a VQA set for
understanding) are out of reach. This module gives the same *kind* of
evaluation on 16x16 RGB images whose ground truth is known exactly:

* ShapesGenEval: prompts carrying GenEval-style metadata (six tags,
  include/exclude requirements) and a deterministic ``judge`` (connected
  components + template matching + nearest colour) that replaces GenEval's
  object detector and CLIP colour classifier.
* ShapesQA: templated questions about random scenes, answered from the scene.

Everything is a pure function of its inputs and seeds; all hashing uses
``hashlib`` (Python's ``hash`` is salted per process).

Design choices (read these before relying on details):

* Unspecified colours. A training image draws every colour its prompt leaves
  open uniformly from ``COLOURS`` (``training_scene``), so a prompt names a
  distribution of images, not one target: the generator has to commit to one
  colour per object from the noise, as a real text-to-image model commits to
  details the prompt leaves open. (An earlier world drew them all white,
  which made generation a lookup table that a quarter of the generation MLP
  could still serve.) The judge ignores colour where the prompt gives none,
  as GenEval does. ``canonical_scene`` keeps white for uncoloured objects: a
  reference rendering for tests and exports, never a training target.
* Richness. Eight shapes and a twelve-step hue wheel (neighbouring colours
  differ by 0.5 in one channel) give 7,800 prompts, and the colour judge
  needs a generator precise to a quarter of the colour range. With open
  colours sampled, the generation MLPs carry real work: zeroing them took
  ShapesGenEval from 0.92-0.97 to 0.07 in 128- and 256-wide models (README,
  "Choosing the world").
* Circle template. A 6x6 disc with single-pixel corners cut has IoU 0.89 with
  the square, and the 24-pixel octagon contains the cross (IoU 0.83). To keep
  every pair of templates at IoU <= 0.8 the circle is a 28-pixel disc cut two
  pixels per corner along the top and bottom rows (see ``TEMPLATES``).
* Boxes are continuous coordinates ``(y0, x0, y1, x1)`` with exclusive ends
  (pixel ``i`` covers ``[i, i+1)``), so extents are pixel counts (6 for a full
  object) and centres are box centres, as in GenEval.
* Generation splits are disjoint in every tag: prompts are ranked by hash
  inside each tag and cut with fixed quotas (about 60/15/25), because a plain
  hash threshold cannot guarantee evaluation prompts for a small tag. A tag
  too small to spare calibration prompts (single objects) has none: no
  calibration prompt is ever an evaluation or training prompt.
* The plural of "cross" is "crosses" (others add "s").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional, Sequence

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
    "circle": _template(
        ["..##..", "######", "######", "######", "######", "..##.."]
    ),
    "triangle": _template(
        ["..##..", "..##..", ".####.", ".####.", "######", "######"]
    ),
    "cross": _template(
        ["..##..", "..##..", "######", "######", "..##..", "..##.."]
    ),
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
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS = ("train", "calib", "eval")
QA_TYPES = ("colour", "shape", "count", "relation")

POSITION_THRESHOLD = 0.1  # GenEval's box-size margin for relations
FG_THRESHOLD = 0.5  # a pixel is foreground if its max channel exceeds this
MIN_COMPONENT = 4  # smaller components are noise, not objects
MIN_IOU = 0.5  # components matching no template this well are not objects


def article(word: str) -> str:
    """The indefinite article before ``word`` ("an orange", "a ring")."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    """English plural used in prompts and questions ("cross" -> "crosses")."""
    return shape + ("es" if shape.endswith("s") else "s")


def _stable_unit(text: str) -> float:
    """Map text to [0, 1) with sha256: stable across processes and machines."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def derive_seed(*parts: object) -> int:
    """Derive a 32-bit seed from arbitrary parts, stably (sha256 of reprs)."""
    text = "|".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


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


# ---------------------------------------------------------------------------
# Generation prompts (ShapesGenEval)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """GenEval-style requirement: ``count`` objects of ``shape``.

    ``colour``: the top ``count`` detections must all have it.
    ``position``: (relation, index of another include requirement): this
    requirement's object must be in that relation to the referenced one.
    """

    shape: str
    count: int
    colour: Optional[str] = None
    position: Optional[tuple] = None


@dataclass(frozen=True)
class GenPrompt:
    """A text-to-image prompt with GenEval's metadata (tag, include, exclude)."""

    tag: str
    text: str
    include: tuple
    exclude: tuple = ()


def _build_gen_prompts() -> tuple:
    """Enumerate every prompt of every tag in a fixed order."""
    out = []
    for s in SHAPES:
        out.append(GenPrompt("single_object", f"{article(s)} {s}", (Requirement(s, 1),)))
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                out.append(
                    GenPrompt(
                        "two_object",
                        f"{article(a)} {a} and {article(b)} {b}",
                        (Requirement(a, 1), Requirement(b, 1)),
                    )
                )
    for n in (2, 3, 4):
        for s in SHAPES:
            out.append(
                GenPrompt(
                    "counting",
                    f"{NUMBERS[n]} {plural(s)}",
                    (Requirement(s, n),),
                    (Requirement(s, n + 1),),
                )
            )
    for c in COLOURS:
        for s in SHAPES:
            out.append(GenPrompt("colors", f"{article(c)} {c} {s}", (Requirement(s, 1, colour=c),)))
    for rel in RELATIONS:
        for a in SHAPES:
            for b in SHAPES:
                if a != b:
                    out.append(
                        GenPrompt(
                            "position",
                            f"{article(b)} {b} {rel} {article(a)} {a}",
                            (Requirement(a, 1), Requirement(b, 1, position=(rel, 0))),
                        )
                    )
    for s1 in SHAPES:
        for s2 in SHAPES:
            if s1 == s2:
                continue
            for c1 in COLOURS:
                for c2 in COLOURS:
                    if c1 != c2:
                        out.append(
                            GenPrompt(
                                "color_attr",
                                f"{article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}",
                                (
                                    Requirement(s1, 1, colour=c1),
                                    Requirement(s2, 1, colour=c2),
                                ),
                            )
                        )
    return tuple(out)


_GEN_PROMPTS = _build_gen_prompts()


def all_gen_prompts() -> list:
    """Every generation prompt, grouped by tag in ``TAGS`` order."""
    return list(_GEN_PROMPTS)


#: split quotas per tag (of the tag's prompts, rounded): evaluation, then calibration
EVAL_FRACTION = 0.25
CALIB_FRACTION = 0.15
#: a tag needs this many prompts to give some to calibration; smaller tags (single objects) go to
#: training and evaluation only and are calibrated through the other tags' prompts
MIN_PROMPTS_FOR_CALIB = 12


def _split_sizes(n: int) -> tuple:
    """(train, calib, eval) prompt counts of a tag with ``n`` prompts."""
    n_eval = max(1, round(EVAL_FRACTION * n))
    n_calib = max(1, round(CALIB_FRACTION * n)) if n >= MIN_PROMPTS_FOR_CALIB else 0
    n_train = n - n_eval - n_calib
    if n_train < 1:
        raise AssertionError(f"a tag with {n} prompts cannot be split")
    return n_train, n_calib, n_eval


@lru_cache(maxsize=None)
def _split_table() -> dict:
    """Prompt text -> split; the three splits are disjoint in every tag.

    Each tag's prompts are ranked by a sha256 of their text and cut by quotas
    (``_split_sizes``), so the split is stable, never leaves evaluation empty
    for a tag, and evaluation prompts are combinations unseen in training.
    """
    table = {}
    for tag in TAGS:
        prompts = [p for p in _GEN_PROMPTS if p.tag == tag]
        ranked = sorted(prompts, key=lambda p: (_stable_unit("gen-split|" + p.text), p.text))
        n_train, n_calib, _ = _split_sizes(len(ranked))
        for i, p in enumerate(ranked):
            table[p.text] = "train" if i < n_train else "calib" if i < n_train + n_calib else "eval"
    return table


def gen_split(prompt: GenPrompt) -> str:
    """"train", "calib" or "eval": every prompt is in exactly one split."""
    return _split_table()[prompt.text]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def gen_prompts(split: str) -> list:
    """The prompts of ``split``, in ``all_gen_prompts`` order."""
    _check_split(split)
    return [p for p in _GEN_PROMPTS if gen_split(p) == split]


def geneval_set(
    split: str,
    samples_per_prompt: int,
    max_prompts_per_tag: Optional[int] = None,
    seed: int = 0,
) -> list:
    """(prompt, sample_seed) pairs to evaluate, as GenEval samples N images/prompt.

    With ``max_prompts_per_tag`` a seeded subset per tag keeps evaluation cheap
    while staying deterministic. Sample seeds depend only on (seed, prompt
    text, sample index), so subsets and orderings do not change them.
    """
    prompts = gen_prompts(split)
    if max_prompts_per_tag is not None:
        keep = set()
        for tag in TAGS:
            texts = [p.text for p in prompts if p.tag == tag]
            if len(texts) > max_prompts_per_tag:
                rng = np.random.default_rng(derive_seed("geneval-subset", seed, split, tag))
                idx = rng.choice(len(texts), size=max_prompts_per_tag, replace=False)
                texts = [texts[i] for i in sorted(idx)]
            keep.update(texts)
        prompts = [p for p in prompts if p.text in keep]
    return [
        (p, derive_seed("geneval-sample", seed, p.text, i))
        for p in prompts
        for i in range(samples_per_prompt)
    ]


_POSITION_SLOTS = {  # relation -> (slot of A, slot of B) for "a B <rel> a A"
    "left of": (1, 0),
    "right of": (0, 1),
    "above": (2, 0),
    "below": (0, 2),
}


def canonical_scene(prompt: GenPrompt) -> Scene:
    """The reference rendering of a prompt: its fixed slots, white where it names no colour."""
    inc = prompt.include
    colour = lambda r: r.colour or DEFAULT_COLOUR  # noqa: E731
    if prompt.tag in ("single_object", "colors"):
        return Scene((Obj(inc[0].shape, colour(inc[0]), 0),))
    if prompt.tag in ("two_object", "color_attr"):
        return Scene((Obj(inc[0].shape, colour(inc[0]), 0), Obj(inc[1].shape, colour(inc[1]), 1)))
    if prompt.tag == "counting":
        return Scene(tuple(Obj(inc[0].shape, colour(inc[0]), i) for i in range(inc[0].count)))
    if prompt.tag == "position":
        slot_a, slot_b = _POSITION_SLOTS[inc[1].position[0]]
        return Scene((Obj(inc[0].shape, colour(inc[0]), slot_a), Obj(inc[1].shape, colour(inc[1]), slot_b)))
    raise ValueError(f"unknown tag {prompt.tag!r}")


def training_scene(prompt: GenPrompt, rng: np.random.Generator) -> Scene:
    """A training target for ``prompt``: its canonical placement, with every colour the prompt
    leaves open drawn uniformly from ``COLOURS`` (one draw per such object, in slot order)."""
    names = list(COLOURS)
    return Scene(tuple(
        Obj(o.shape, names[int(rng.integers(len(names)))] if o.colour == DEFAULT_COLOUR else o.colour, o.slot)
        for o in canonical_scene(prompt).objects))


def sample_gen_example(rng: np.random.Generator, split: str = "train") -> tuple:
    """(prompt, target image) for training: uniform over tags, then prompts, then open colours.

    Sampling tags first stops color_attr (thousands of prompts) from swamping
    the few single-object and counting prompts.
    """
    tag = TAGS[int(rng.integers(len(TAGS)))]
    prompts = _prompts_by_tag(split)[tag]
    prompt = prompts[int(rng.integers(len(prompts)))]
    return prompt, render(training_scene(prompt, rng))


@lru_cache(maxsize=None)
def _prompts_by_tag(split: str) -> dict:
    ps = gen_prompts(split)
    return {t: tuple(p for p in ps if p.tag == t) for t in TAGS}


# ---------------------------------------------------------------------------
# Judge (replaces GenEval's detector and colour classifier)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """A detected object. ``bbox`` is (y0, x0, y1, x1) with exclusive ends."""

    shape: str
    colour: str
    centre: tuple
    bbox: tuple
    area: int
    confidence: float


def _components(mask: np.ndarray) -> list:
    """4-connected components of a bool mask, as lists of (row, col), scan order."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(pixels)
    return comps


_TEMPLATE_STACK = np.stack([TEMPLATES[s] for s in SHAPES]).astype(np.int32)
_TEMPLATE_AREA = _TEMPLATE_STACK.sum(axis=(1, 2))
_COLOUR_NAMES = tuple(ALL_COLOURS)
_COLOUR_TABLE = np.array([ALL_COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64)


def _match_shape(comp: np.ndarray, bbox: tuple) -> tuple:
    """Best (shape, IoU) sliding each template over every placement touching the box.

    Searching placements (rather than assuming the box is the template's) keeps
    the match exact when noise adds or removes pixels at the object's edge.
    """
    y0, x0, y1, x1 = bbox
    padded = np.pad(comp.astype(np.int32), OBJ)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (OBJ, OBJ))
    # window index i <-> template top-left row i - OBJ; keep overlaps with box
    win = windows[y0 + 1 : y1 + OBJ, x0 + 1 : x1 + OBJ]
    inter = np.einsum("abij,tij->tab", win, _TEMPLATE_STACK)
    union = comp.sum() + _TEMPLATE_AREA[:, None, None] - inter
    iou = (inter / union).reshape(len(SHAPES), -1).max(axis=1)
    best = int(np.argmax(iou))  # ties go to the earlier shape: deterministic
    return SHAPES[best], float(iou[best])


def detect(image: np.ndarray) -> list:
    """Find objects: components of bright pixels, named by template and colour.

    Returned sorted by confidence (desc), ties in scan order, so callers can
    take "the top k detections" like GenEval does with detector scores.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"expected image of shape {(CANVAS, CANVAS, 3)}, got {img.shape}")
    mask = img.max(axis=2) > FG_THRESHOLD
    dets = []
    for pixels in _components(mask):
        if len(pixels) < MIN_COMPONENT:
            continue
        ys = np.array([p[0] for p in pixels])
        xs = np.array([p[1] for p in pixels])
        box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        comp = np.zeros((CANVAS, CANVAS), dtype=bool)
        comp[ys, xs] = True
        shape, iou = _match_shape(comp, box)
        if iou < MIN_IOU:
            continue
        mean_rgb = img[ys, xs].mean(axis=0)
        colour = _COLOUR_NAMES[int(np.argmin(((_COLOUR_TABLE - mean_rgb) ** 2).sum(axis=1)))]
        fbox = tuple(float(v) for v in box)
        dets.append(
            Detection(
                shape=shape,
                colour=colour,
                centre=((fbox[0] + fbox[2]) / 2.0, (fbox[1] + fbox[3]) / 2.0),
                bbox=fbox,
                area=len(pixels),
                confidence=iou,
            )
        )
    dets.sort(key=lambda d: -d.confidence)  # stable: ties keep scan order
    return dets


def judge(image: np.ndarray, prompt: GenPrompt, detections: Optional[list] = None) -> bool:
    """GenEval's correctness rule for one image: includes ANDed, excludes ORed.

    Position requirements compare every one of this requirement's top
    ``count`` detections with every matched detection of the referenced
    requirement (GenEval's loop; with count 1 it is top versus top).
    """
    dets = detect(image) if detections is None else detections
    by_shape = {}
    for d in sorted(dets, key=lambda d: -d.confidence):
        by_shape.setdefault(d.shape, []).append(d)
    ok = True
    matched = []
    for req in prompt.include:
        found = by_shape.get(req.shape, [])[: req.count]
        good = len(found) >= req.count
        if good and req.colour is not None:
            good = all(d.colour == req.colour for d in found)
        if good and req.position is not None:
            rel, ref = req.position
            targets = matched[ref] if ref < len(matched) else None
            good = targets is not None and all(
                rel in relations(d.bbox, t.bbox) for d in found for t in targets
            )
        matched.append(found if good else None)
        ok = ok and good
    for req in prompt.exclude:
        if len(by_shape.get(req.shape, [])) >= req.count:
            ok = False
    return ok


def _binomial_se(correct: Sequence[bool]) -> float:
    """Standard error of an accuracy over independent trials."""
    p = float(np.mean(correct))
    return float(np.sqrt(p * (1.0 - p) / len(correct)))


def _clustered_se(by_prompt: dict) -> float:
    """Standard error of an accuracy over prompts and their samples.

    The samples of one prompt are not independent (a model that cannot draw
    "two crosses" fails every seed), so the prompt is the unit: the standard
    deviation of the per-prompt accuracies over sqrt(number of prompts). With
    a single prompt only the samples vary, and the binomial error is used.
    """
    if len(by_prompt) < 2:
        return _binomial_se([c for v in by_prompt.values() for c in v])
    means = np.array([np.mean(v) for v in by_prompt.values()])
    return float(means.std(ddof=1) / np.sqrt(len(means)))


def geneval_scores(results: Iterable) -> dict:
    """Per-tag accuracy over images, "overall" = unweighted mean of tags, and
    their standard errors under "se" (per tag over prompts and samples; the
    overall one combines the tags' as independent estimates).

    The unweighted mean matches GenEval's headline number, so tags with many
    prompts (color_attr) do not dominate.
    """
    per_tag = {t: {} for t in TAGS}
    n = 0
    for prompt, correct in results:
        per_tag[prompt.tag].setdefault(prompt.text, []).append(bool(correct))
        n += 1
    out, se = tag_accuracies(per_tag)
    out["se"] = se
    out["n_images"] = n
    return out


def tag_accuracies(by_tag: dict) -> tuple[dict, dict]:
    """GenEval's scoring of correct/incorrect images, ``{tag: {prompt: [correct, ...]}}``: per-tag accuracy
    over images and "overall" = their unweighted mean, with standard errors (per tag clustered by
    prompt, ``_clustered_se``; the overall one combining the tags' as independent estimates).
    Returns (scores, standard errors), both keyed by tag and "overall"; every tag needs results."""
    missing = [t for t, v in by_tag.items() if not v]
    if missing:
        raise ValueError(f"no results for tags {missing}")
    scores = {t: float(np.mean([c for v in prompts.values() for c in v])) for t, prompts in by_tag.items()}
    se = {t: _clustered_se(prompts) for t, prompts in by_tag.items()}
    scores["overall"] = float(np.mean([scores[t] for t in by_tag]))
    se["overall"] = float(np.sqrt(sum(se[t] ** 2 for t in by_tag)) / len(by_tag))
    return scores, se


# ---------------------------------------------------------------------------
# Understanding questions (ShapesQA)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QAItem:
    """A question about a scene, with its one-word answer and question type."""

    scene: Scene
    question: str
    answer: str
    qtype: str


def qa_split(scene: Scene, question: str) -> str:
    """Stable ~70/10/20 split on (scene, question) so eval pairs are unseen."""
    key = ";".join(f"{o.slot}:{o.shape}:{o.colour}" for o in scene.objects)
    u = _stable_unit(f"qa-split|{key}|{question}")
    return "train" if u < 0.7 else "calib" if u < 0.8 else "eval"


def _random_objects(rng: np.random.Generator, shapes: list) -> Scene:
    """Scene with the given shapes in random distinct slots, random colours."""
    slots = rng.permutation(N_SLOTS)[: len(shapes)]
    names = list(COLOURS)
    return Scene(
        tuple(
            Obj(s, names[int(rng.integers(len(names)))], int(slot))
            for s, slot in zip(shapes, slots)
        )
    )


def _unique(values: list) -> list:
    """Values occurring exactly once, in first-seen order."""
    return [v for v in dict.fromkeys(values) if values.count(v) == 1]


def _random_qa(rng: np.random.Generator, qtype: str) -> Optional[QAItem]:
    """One candidate item of ``qtype``, or None when the scene does not fit it."""
    if qtype == "count":
        # Draw the answer first so counts 0..4 are balanced (random scenes
        # would almost never hold four objects of one shape).
        n = int(rng.integers(len(NUMBERS)))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        total = N_SLOTS if n == N_SLOTS else int(rng.integers(max(n, 1), N_SLOTS + 1))
        others = [s for s in SHAPES if s != shape]
        shapes = [shape] * n + [others[int(rng.integers(len(others)))] for _ in range(total - n)]
        scene = _random_objects(rng, shapes)
        return QAItem(scene, f"how many {plural(shape)} are there", NUMBERS[n], qtype)

    if qtype == "relation":
        return _relation_qa(rng)
    k = int(rng.integers(1, N_SLOTS + 1))
    scene = _random_objects(rng, [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(k)])
    objs = scene.objects
    if qtype == "colour":
        uniq = _unique([o.shape for o in objs])
        if not uniq:
            return None
        shape = uniq[int(rng.integers(len(uniq)))]
        obj = next(o for o in objs if o.shape == shape)
        return QAItem(scene, f"what colour is the {shape}", obj.colour, qtype)
    if qtype == "shape":
        uniq = _unique([o.colour for o in objs])
        if not uniq:
            return None
        colour = uniq[int(rng.integers(len(uniq)))]
        obj = next(o for o in objs if o.colour == colour)
        return QAItem(scene, f"what shape is the {colour} object", obj.shape, qtype)
    raise ValueError(f"unknown qtype {qtype!r}")


#: answer word of each relation in "where is the A relative to the B"
RELATION_ANSWERS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
#: slot pairs in one row or one column: exactly one GenEval relation holds between them
_ALIGNED_PAIRS = [(a, b) for a in range(N_SLOTS) for b in range(N_SLOTS)
                  if a != b and (a // 2 == b // 2 or a % 2 == b % 2)]


def _relation_qa(rng: np.random.Generator) -> QAItem:
    """"where is the A relative to the B" about two objects in one row or column.

    Design: the yes/no form "is the A left of the B" balanced 50/50 gave a tiny model no
    first-order cue (only the conjunction of relation word and positions carries signal) and it
    stayed at chance; here the answer itself is the relation (left/right/above/below), determined
    by GenEval's rule, with exactly one relation true because the objects share a row or column.
    """
    slot_a, slot_b = _ALIGNED_PAIRS[int(rng.integers(len(_ALIGNED_PAIRS)))]
    shape_a, shape_b = rng.choice(len(SHAPES), size=2, replace=False)
    colours = list(COLOURS)
    oa = Obj(SHAPES[int(shape_a)], colours[int(rng.integers(len(colours)))], slot_a)
    ob = Obj(SHAPES[int(shape_b)], colours[int(rng.integers(len(colours)))], slot_b)
    (rel,) = relations(object_bbox(oa), object_bbox(ob))
    return QAItem(Scene((oa, ob)), f"where is the {oa.shape} relative to the {ob.shape}", RELATION_ANSWERS[rel], "relation")


def sample_qa(rng: np.random.Generator, split: str, qtype_weights: Optional[Sequence[float]] = None) -> QAItem:
    """Draw a QA item of ``split``: qtype uniform (or by ``qtype_weights``, in QA_TYPES order),
    then rejection on the hash split.

    The qtype is drawn once, before rejection, so types that reject more
    often are not under-represented.
    """
    _check_split(split)
    if qtype_weights is None:
        qtype = QA_TYPES[int(rng.integers(len(QA_TYPES)))]
    else:
        w = np.asarray(qtype_weights, dtype=np.float64)
        if w.shape != (len(QA_TYPES),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"qtype_weights needs {len(QA_TYPES)} non-negative weights ({QA_TYPES})")
        qtype = QA_TYPES[int(rng.choice(len(QA_TYPES), p=w / w.sum()))]
    for _ in range(100_000):
        item = _random_qa(rng, qtype)
        if item is not None and qa_split(item.scene, item.question) == split:
            return item
    raise RuntimeError("could not sample a QA item")  # pragma: no cover


def qa_set(split: str, n: int, seed: int) -> list:
    """``n`` QA items of ``split``, a pure function of (split, n, seed)."""
    rng = np.random.default_rng(derive_seed("qa-set", seed, split))
    return [sample_qa(rng, split) for _ in range(n)]


def qa_scores(results: Iterable) -> dict:
    """Accuracy per qtype present, "overall" over all items, their binomial
    standard errors under "se" (one sample per item), and "n_items"."""
    per = {}
    for item, correct in results:
        per.setdefault(item.qtype, []).append(bool(correct))
    if not per:
        raise ValueError("no QA results")
    out = {q: float(np.mean(per[q])) for q in QA_TYPES if q in per}
    every = [c for v in per.values() for c in v]
    out["overall"] = float(np.mean(every))
    out["se"] = {**{q: _binomial_se(per[q]) for q in QA_TYPES if q in per}, "overall": _binomial_se(every)}
    out["n_items"] = len(every)
    return out


# ---------------------------------------------------------------------------
# Text and vocabulary
# ---------------------------------------------------------------------------

SPECIALS = ("<pad>", "<bos>", "<eos>", "<img>", "</img>")
PAD_ID, BOS_ID, EOS_ID, IMG_ID, IMG_END_ID = range(len(SPECIALS))


def all_questions() -> list:
    """Every question text the QA generator can produce."""
    qs = [f"what colour is the {s}" for s in SHAPES]
    qs += [f"what shape is the {c} object" for c in COLOURS]
    qs += [f"how many {plural(s)} are there" for s in SHAPES]
    qs += [f"where is the {a} relative to the {b}" for a in SHAPES for b in SHAPES if a != b]
    return qs


def all_answers() -> list:
    """Every answer the QA generator can produce."""
    return list(COLOURS) + list(SHAPES) + list(NUMBERS) + list(RELATION_ANSWERS.values())


def _build_vocab() -> tuple:
    words = set()
    for text in [p.text for p in _GEN_PROMPTS] + all_questions() + all_answers():
        words.update(text.split())
    return SPECIALS + tuple(sorted(words - set(SPECIALS)))


VOCAB = _build_vocab()
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_PROMPT_WORDS = max(len(p.text.split()) for p in _GEN_PROMPTS)
MAX_QUESTION_WORDS = max(len(q.split()) for q in all_questions())


def encode(text: str) -> list:
    """Whitespace-tokenise into vocabulary ids (no <bos>/<eos> are added)."""
    ids = []
    for word in text.split():
        if word not in _WORD_ID:
            raise ValueError(f"unknown word {word!r} in {text!r}")
        ids.append(_WORD_ID[word])
    return ids


def decode(ids: Iterable[int]) -> str:
    """Ids back to space-joined words (specials included, nothing stripped)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < len(VOCAB)]
    if bad:
        raise ValueError(f"ids out of vocabulary range: {bad}")
    return " ".join(VOCAB[i] for i in ids)
