"""ShapesGenEval's prompts: every text-to-image prompt with GenEval's metadata (tag, include and
exclude requirements), their train/calib/eval split, the evaluation sets, and the training targets.

* Generation splits are disjoint in every tag: prompts are ranked by hash inside each tag and cut
  with fixed quotas (about 60/15/25), because a plain hash threshold cannot guarantee evaluation
  prompts for a small tag. A tag too small to spare calibration prompts (single objects) has none:
  no calibration prompt is ever an evaluation or training prompt.
* Unspecified colours: a training image draws every colour its prompt leaves open uniformly from
  ``COLOURS`` (``training_scene``); ``canonical_scene`` keeps white for them (see ``worlds.shapes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from .scenes import COLOURS, DEFAULT_COLOUR, NUMBERS, RELATIONS, SHAPES, Obj, Scene, article, plural, render
from .splits import check_split, derive_seed, stable_unit

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


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
        ranked = sorted(prompts, key=lambda p: (stable_unit("gen-split|" + p.text), p.text))
        n_train, n_calib, _ = _split_sizes(len(ranked))
        for i, p in enumerate(ranked):
            table[p.text] = "train" if i < n_train else "calib" if i < n_train + n_calib else "eval"
    return table


def gen_split(prompt: GenPrompt) -> str:
    """ "train", "calib" or "eval": every prompt is in exactly one split."""
    return _split_table()[prompt.text]


def gen_prompts(split: str) -> list:
    """The prompts of ``split``, in ``all_gen_prompts`` order."""
    check_split(split)
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
    return [(p, derive_seed("geneval-sample", seed, p.text, i)) for p in prompts for i in range(samples_per_prompt)]


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
    return Scene(
        tuple(
            Obj(o.shape, names[int(rng.integers(len(names)))] if o.colour == DEFAULT_COLOUR else o.colour, o.slot)
            for o in canonical_scene(prompt).objects
        )
    )


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
