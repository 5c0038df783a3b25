"""The allowed range of every numeric stage setting, defined once (pure Python, no torch).

Both checks read it: ``spec.merge_spec`` (every verb's settings, ``--spec`` / ``--train`` / ...) and the
config schema, where a node ``range: <kind>.<key>`` stands for these bounds
(``config_checks.config_schema`` fills them in as ``minimum`` / ``exclusiveMinimum`` / ``maximum``), so
the CLI and the pipeline accept exactly the same values. A bound applies to a number, or to each number
of a list (``cfg_interval``, ``qa_weights``). Non-finite numbers (nan, inf) are refused everywhere
before any bound is looked at: JSON-schema bounds never reject NaN.

The kinds are the ``what`` of ``merge_spec``: ``training`` (``train.TRAIN_DEFAULTS``, config ``train``),
``tuning`` (``moe.tune.TUNE_DEFAULTS``, config ``moe.tune.*``), ``evaluation``
(``evaluate.runner.EVAL_DEFAULTS``, config ``evaluate``) and ``calibration`` (``calibrate.CALIB_DEFAULTS``,
config ``calibrate``).
"""

from __future__ import annotations

import math

#: most ShapesQA items one evaluation or calibration may ask for. The generator samples with
#: replacement (``worlds.qa.qa_set``: no natural end), so this is a sanity bound: a million items
#: is 1,000 times the default evaluation's and would take hours on the tiny model; 10**12 (a typo
#: or a hostile config) would never end.
MAX_QA_ITEMS = 10**6
#: widest co-activation sketch: it costs MLP width x d floats per layer and tower (BAGEL's MLP width
#: is 18,944; the default d is 256); beyond 2**16 the sketch would outgrow any device's memory
MAX_COACTIVATION_DIM = 2**16

POSITIVE = {"minimum": 1}  # a count: zero items, steps or repeats produce no work
NONNEGATIVE = {"minimum": 0}  # a seed, a weight decay
FRACTION = {"minimum": 0, "maximum": 1}
RATE = {"exclusiveMinimum": 0}  # a learning rate, a gradient-clip norm

_SAMPLER = {"num_steps": POSITIVE, "cfg_scale": NONNEGATIVE, "cfg_interval": FRACTION, "cfg_renorm_min": FRACTION}
_SHAPES_DATA = {
    "qa_items": {"minimum": 1, "maximum": MAX_QA_ITEMS},
    "qa_seed": NONNEGATIVE,
    "samples_per_prompt": POSITIVE,
    "max_prompts_per_tag": POSITIVE,
    "gen_seed": NONNEGATIVE,
}
_OPTIMISER = {
    "steps": POSITIVE,
    "batch_gen": POSITIVE,
    "lr": RATE,
    "weight_decay": NONNEGATIVE,
    "warmup_frac": FRACTION,
    "min_lr_frac": FRACTION,
    "cond_dropout": FRACTION,
    "grad_clip": RATE,
    "checkpoint_every": POSITIVE,
    "seed": NONNEGATIVE,
    "threads": POSITIVE,
}

#: {settings kind: {key: bounds}}
RANGES: dict[str, dict[str, dict]] = {
    "training": {**_OPTIMISER, "batch_und": POSITIVE, "qa_weights": NONNEGATIVE},
    "tuning": {**_OPTIMISER, "balance_coef": NONNEGATIVE},
    "evaluation": {
        **_SHAPES_DATA,
        **_SAMPLER,
        "batch_size": POSITIVE,
        "threads": POSITIVE,
        "latency_repeats": POSITIVE,
        "mme_max_images_per_subtask": POSITIVE,
    },
    "calibration": {
        **_SHAPES_DATA,
        **_SAMPLER,
        "batch_size": POSITIVE,
        "threads": POSITIVE,
        "coactivation_dim": {"minimum": 1, "maximum": MAX_COACTIVATION_DIM},
        "coactivation_seed": NONNEGATIVE,
        "calib_items": POSITIVE,
    },
    "tune_data": {
        "max_samples": POSITIVE,
        "shard_size": POSITIVE,
        "batch_size": POSITIVE,
        "seed": NONNEGATIVE,
        "teacher_steps": POSITIVE,
        "teacher_cfg_scale": NONNEGATIVE,
    },
    "tune_data_contamination": {
        "ngram": POSITIVE,
        "near_overlap": {"exclusiveMinimum": 0, "maximum": 1},
        "max_exact": NONNEGATIVE,
        "max_near_fraction": FRACTION,
        "examples": NONNEGATIVE,
    },
}
#: settings that may also be null (None): no cap (every prompt of a tag, every image of a subtask)
NULLABLE = {
    "evaluation": {"max_prompts_per_tag", "mme_max_images_per_subtask"},
    "calibration": {"max_prompts_per_tag"},
    "tune_data": {"max_samples"},
}


def bounds(name: str) -> dict:
    """The bounds ``name`` (``"training.lr"``) stands for; a ValueError for a name with none."""
    kind, _, key = name.partition(".")
    try:
        return dict(RANGES[kind][key])
    except KeyError:
        raise ValueError(f"no range {name!r} in unisparse.ranges (kinds: {sorted(RANGES)})") from None


def describe(b: dict) -> str:
    """Bounds as a reader writes them: ``>= 0 and <= 1``."""
    ops = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    return " and ".join(f"{ops[k]} {v}" for k, v in b.items())


def within(value, b: dict) -> bool:
    """Whether the finite number ``value`` satisfies the bounds ``b``."""
    return (
        value >= b.get("minimum", -math.inf)
        and value > b.get("exclusiveMinimum", -math.inf)
        and value <= b.get("maximum", math.inf)
        and value < b.get("exclusiveMaximum", math.inf)
    )
