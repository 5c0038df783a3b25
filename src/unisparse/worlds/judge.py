"""ShapesGenEval's judge, replacing GenEval's object detector and CLIP colour classifier: connected
components of bright pixels, named by template matching and nearest colour, and GenEval's
correctness rule for one image (includes ANDed, excludes ORed, positions by ``relations``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .prompts import GenPrompt
from .scenes import ALL_COLOURS, CANVAS, OBJ, SHAPES, TEMPLATES, relations

FG_THRESHOLD = 0.5  # a pixel is foreground if its max channel exceeds this
MIN_COMPONENT = 4  # smaller components are noise, not objects
MIN_IOU = 0.5  # components matching no template this well are not objects


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
            good = targets is not None and all(rel in relations(d.bbox, t.bbox) for d in found for t in targets)
        matched.append(found if good else None)
        ok = ok and good
    for req in prompt.exclude:
        if len(by_shape.get(req.shape, [])) >= req.count:
            ok = False
    return ok
