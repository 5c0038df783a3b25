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
  ShapesGenEval from 0.92-0.97 to 0.07 in 128- and 256-wide models
  (docs/results.md, "Choosing the world").
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

The world lives in one module per job; this module re-exports their public names, so callers keep
writing ``shapes.X``:

* ``scenes``: constants, shapes and colours, ``Obj``/``Scene``, ``render``, spatial ``relations``
* ``splits``: split names and sha256-based seeds (``derive_seed``)
* ``prompts``: ShapesGenEval prompts, their splits, evaluation sets and training examples
* ``judge``: the detector (``detect``) and GenEval's correctness rule (``judge``)
* ``qa``: ShapesQA items, their split and generator
* ``scoring``: accuracies and standard errors of both benchmarks (``tag_accuracies``)
* ``vocab``: the whitespace vocabulary, ``encode`` and ``decode``
"""

from __future__ import annotations

from .judge import FG_THRESHOLD, MIN_COMPONENT, MIN_IOU, Detection, detect, judge
from .prompts import (
    CALIB_FRACTION,
    EVAL_FRACTION,
    MIN_PROMPTS_FOR_CALIB,
    TAGS,
    GenPrompt,
    Requirement,
    all_gen_prompts,
    canonical_scene,
    gen_prompts,
    gen_split,
    geneval_set,
    sample_gen_example,
    training_scene,
)
from .qa import QA_TYPES, RELATION_ANSWERS, QAItem, all_answers, all_questions, qa_set, qa_split, sample_qa
from .scenes import (
    ALL_COLOURS,
    CANVAS,
    COLOURS,
    DEFAULT_COLOUR,
    DEFAULT_RGB,
    N_SLOTS,
    NUMBERS,
    OBJ,
    OBJ_OFFSET,
    POSITION_THRESHOLD,
    RELATIONS,
    SHAPES,
    SLOT,
    TEMPLATES,
    Obj,
    Scene,
    article,
    box_relations,
    object_bbox,
    plural,
    relations,
    render,
    slot_origin,
)
from .scoring import geneval_scores, qa_scores, tag_accuracies
from .splits import SPLITS, derive_seed
from .vocab import (
    BOS_ID,
    EOS_ID,
    IMG_END_ID,
    IMG_ID,
    MAX_PROMPT_WORDS,
    MAX_QUESTION_WORDS,
    PAD_ID,
    SPECIALS,
    VOCAB,
    decode,
    encode,
)

__all__ = [
    # scenes
    "CANVAS",
    "SLOT",
    "OBJ",
    "OBJ_OFFSET",
    "N_SLOTS",
    "SHAPES",
    "TEMPLATES",
    "COLOURS",
    "DEFAULT_COLOUR",
    "DEFAULT_RGB",
    "ALL_COLOURS",
    "NUMBERS",
    "RELATIONS",
    "POSITION_THRESHOLD",
    "article",
    "plural",
    "Obj",
    "Scene",
    "slot_origin",
    "object_bbox",
    "render",
    "box_relations",
    "relations",
    # splits
    "SPLITS",
    "derive_seed",
    # prompts
    "TAGS",
    "Requirement",
    "GenPrompt",
    "all_gen_prompts",
    "EVAL_FRACTION",
    "CALIB_FRACTION",
    "MIN_PROMPTS_FOR_CALIB",
    "gen_split",
    "gen_prompts",
    "geneval_set",
    "canonical_scene",
    "training_scene",
    "sample_gen_example",
    # judge
    "FG_THRESHOLD",
    "MIN_COMPONENT",
    "MIN_IOU",
    "Detection",
    "detect",
    "judge",
    # qa
    "QA_TYPES",
    "QAItem",
    "qa_split",
    "RELATION_ANSWERS",
    "sample_qa",
    "qa_set",
    "all_questions",
    "all_answers",
    # scoring
    "geneval_scores",
    "tag_accuracies",
    "qa_scores",
    # vocab
    "SPECIALS",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "IMG_ID",
    "IMG_END_ID",
    "VOCAB",
    "MAX_PROMPT_WORDS",
    "MAX_QUESTION_WORDS",
    "encode",
    "decode",
]
