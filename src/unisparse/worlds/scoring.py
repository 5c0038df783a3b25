"""Scores of both shapes benchmarks: accuracies and their standard errors (GenEval's per-tag
scoring, ``tag_accuracies``, serves the real GenEval too)."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .prompts import TAGS
from .qa import QA_TYPES


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
