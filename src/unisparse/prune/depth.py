"""Depth pruning: drop the sublayers whose output changes the residual stream least.

Scores are mean cosine similarities from calibration (high = the sublayer barely changes the
stream). One-shot drops the n highest at once; iterative drops one, recalibrates, and repeats.
A dropped sublayer is recorded in the config, its weights are not stored, and it is not computed.
"""
from __future__ import annotations

import logging

import torch

from ..models import check_component
from .common import derived_config, restructure

log = logging.getLogger(__name__)

GRANULARITIES = ("block", "attn", "mlp")
SCORE_DEFINITIONS = ("ld", "bagel")


def drop_scores(calibration, component: str, granularity: str, score: str = "ld") -> torch.Tensor:
    """Per-layer cosine used to rank layers for dropping (NaN where the sublayer is already gone)."""
    check_component(component)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if score not in SCORE_DEFINITIONS:
        raise ValueError(f"unknown score definition {score!r}; expected one of {SCORE_DEFINITIONS}")
    name = "attn" if granularity == "attn" else f"{granularity}_{score}"
    scores = calibration.cosine(component, name)
    if torch.isnan(scores).all():
        raise ValueError(
            f"calibration on task {calibration.task!r} has no {component!r} tokens: the {component} "
            f"component is not exercised by that task, so it cannot rank its layers")
    return scores


def choose_layers(scores: torch.Tensor, n: int) -> list[int]:
    """The n layers with the highest cosine (ties broken by lower layer index)."""
    available = [i for i in range(len(scores)) if not torch.isnan(scores[i])]
    if n > len(available):
        raise ValueError(f"cannot drop {n} sublayers: only {len(available)} remain")
    order = sorted(available, key=lambda i: (-float(scores[i]), i))
    return sorted(order[:n])


def apply_drop(model, component: str, granularity: str, layers: list[int], skipped_attention_kv: str | None = None):
    """A new model with ``layers`` of that component's sublayers dropped."""
    skip = {c: {s: list(v) for s, v in subs.items()} for c, subs in model.config.skip.items()}
    subs = ("attn", "mlp") if granularity == "block" else (granularity,)
    comp_skip = skip.setdefault(component, {})
    for sub in subs:
        comp_skip[sub] = sorted(set(comp_skip.get(sub, [])) | set(layers))
    kv = skipped_attention_kv or model.config.skipped_attention_kv
    return restructure(model, derived_config(model, skip=skip, skipped_attention_kv=kv))


def prune_depth(model, calibration, component: str, granularity: str, n_drop: int, score: str = "ld",
                skipped_attention_kv: str = "keep", iterative: bool = False, recalibrate=None):
    """Drop ``n_drop`` sublayers of ``component``. ``recalibrate(model) -> calibration`` is needed
    for the iterative variant (drop one, recalibrate on the pruned model, repeat)."""
    if n_drop < 0:
        raise ValueError("n_drop must be >= 0")
    if n_drop == 0:
        return restructure(model, derived_config(model, skipped_attention_kv=skipped_attention_kv))
    if not iterative:
        layers = choose_layers(drop_scores(calibration, component, granularity, score), n_drop)
        log.info("dropping %s %s sublayers %s", component, granularity, layers)
        return apply_drop(model, component, granularity, layers, skipped_attention_kv)
    if recalibrate is None:
        raise ValueError("iterative depth pruning needs a recalibrate function")
    for step in range(n_drop):
        if step > 0:
            calibration = recalibrate(model)
        layers = choose_layers(drop_scores(calibration, component, granularity, score), 1)
        log.info("iterative step %d: dropping %s %s sublayer %s", step, component, granularity, layers)
        model = apply_drop(model, component, granularity, layers, skipped_attention_kv)
    return model
