"""Depth pruning: drop the sublayers whose output changes the residual stream least.

Scores are mean cosine similarities from calibration (high = the sublayer barely changes the
stream). Granularities: whole blocks, attention sublayers, MLP sublayers, or ``sublayer`` (attention
and MLP sublayers ranked together on one scale, so a small model still gives a curve of 2L points).
One-shot drops the n highest at once; iterative drops one, recalibrates, and repeats.
A dropped sublayer is recorded in the family's config, its weights are not stored, and it is not
computed. The model is seen through its family adapter (``families.Family``).
"""

from __future__ import annotations

import logging

import torch

from ..choices import DEPTH_SCORES as SCORE_DEFINITIONS
from ..choices import GRANULARITIES
from ..families import family_for, like_given, require_family

log = logging.getLogger(__name__)


def drop_scores(calibration, component: str, granularity: str, score: str = "ld") -> torch.Tensor:
    """Per-layer cosine used to rank layers for dropping (NaN where the sublayer is already gone)."""
    if granularity not in GRANULARITIES or granularity == "sublayer":
        raise ValueError(f"unknown per-layer granularity {granularity!r}; expected one of {GRANULARITIES[:3]}")
    if score not in SCORE_DEFINITIONS:
        raise ValueError(f"unknown score definition {score!r}; expected one of {SCORE_DEFINITIONS}")
    name = "attn" if granularity == "attn" else f"{granularity}_{score}"
    scores = calibration.cosine(component, name)
    if torch.isnan(scores).all():
        raise ValueError(
            f"calibration on task {calibration.task!r} has no {component!r} tokens: the {component} "
            f"component is not exercised by that task, so it cannot rank its layers"
        )
    return scores


def choose_layers(scores: torch.Tensor, n: int) -> list[int]:
    """The n layers with the highest cosine (ties broken by lower layer index)."""
    available = [i for i in range(len(scores)) if not torch.isnan(scores[i])]
    if n > len(available):
        raise ValueError(f"cannot drop {n} sublayers: only {len(available)} remain")
    order = sorted(available, key=lambda i: (-float(scores[i]), i))
    return sorted(order[:n])


def choose_sublayers(calibration, component: str, granularity: str, n: int, score: str = "ld") -> dict:
    """``{sublayer: [layers]}`` of the n sublayers to drop. ``sublayer`` ranks attention
    (``cos(h, h + attn)``) and MLP (``cos(h, h + mlp)``) sublayers together: only the ``ld``
    definition puts both on one scale. Ties go to the lower layer, then attention."""
    if granularity != "sublayer":
        layers = choose_layers(drop_scores(calibration, component, granularity, score), n)
        return {sub: layers for sub in (("attn", "mlp") if granularity == "block" else (granularity,))}
    if score != "ld":
        raise ValueError(
            f"granularity 'sublayer' ranks attention and MLP sublayers on one scale, which only "
            f"the 'ld' score definition gives (got {score!r})"
        )
    per_sub = {sub: drop_scores(calibration, component, sub, score) for sub in ("attn", "mlp")}
    available = [(sub, i) for sub, scores in per_sub.items() for i in range(len(scores)) if not torch.isnan(scores[i])]
    if n > len(available):
        raise ValueError(f"cannot drop {n} sublayers: only {len(available)} remain")
    order = sorted(available, key=lambda si: (-float(per_sub[si[0]][si[1]]), si[1], si[0]))
    return {sub: sorted(i for s, i in order[:n] if s == sub) for sub in per_sub}


def apply_drop(family, component: str, sublayers: dict, skipped_attention_kv: str | None = None):
    """A new ``Family`` with the ``{sublayer: [layers]}`` of that component dropped (added to what is
    already dropped)."""
    require_family(family, "apply_drop").check_component(component)
    done = family.skipped(component)
    skip = {component: {sub: sorted(set(done.get(sub, [])) | set(layers)) for sub, layers in sublayers.items()}}
    return family.rebuild(skip=skip, **_options(family, skipped_attention_kv))


def _options(family, skipped_attention_kv):
    """The depth options this family understands (the MoT's rule for a dropped joint-attention
    sublayer; a family without joint attention across components has none)."""
    if skipped_attention_kv is None:
        return {}
    if "skipped_attention_kv" not in family.options:
        if skipped_attention_kv != "keep":
            raise ValueError(
                f"skipped_attention_kv {skipped_attention_kv!r}: the {family.name} family has no joint "
                "attention across components to withhold keys and values from"
            )
        return {}
    return {"skipped_attention_kv": skipped_attention_kv}


def prune_depth(
    model,
    calibration,
    component: str,
    granularity: str,
    n_drop: int,
    score: str = "ld",
    skipped_attention_kv: str = "keep",
    iterative: bool = False,
    recalibrate=None,
):
    """Drop ``n_drop`` sublayers of ``component``. ``recalibrate(family) -> calibration`` is needed
    for the iterative variant (drop one, recalibrate on the pruned model, repeat). Returns a
    ``Family`` for a ``Family``, a bare model for a bare model."""
    family = family_for(model)
    family.check_component(component)
    if n_drop < 0:
        raise ValueError("n_drop must be >= 0")
    if iterative and n_drop and recalibrate is None:
        raise ValueError("iterative depth pruning needs a recalibrate function")
    if n_drop == 0:
        pruned = family.rebuild(**_options(family, skipped_attention_kv))
    elif not iterative:
        chosen = choose_sublayers(calibration, component, granularity, n_drop, score)
        log.info("dropping %s %s sublayers %s", component, granularity, chosen)
        pruned = apply_drop(family, component, chosen, skipped_attention_kv)
    else:
        pruned = family
        for step in range(n_drop):
            if step > 0:
                calibration = recalibrate(like_given(pruned, model))  # the caller's own form
            chosen = choose_sublayers(calibration, component, granularity, 1, score)
            log.info("iterative step %d: dropping %s %s sublayer %s", step, component, granularity, chosen)
            pruned = apply_drop(pruned, component, chosen, skipped_attention_kv)
    return like_given(pruned, model)
