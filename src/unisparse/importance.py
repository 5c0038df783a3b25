"""Neuron importance of a dense MLP: one score per neuron, used by width pruning (keep the top) and
by expert partitioning (deal neurons out by rank).

Scores per neuron j (``NEURON_SCORES``):
  * ``act_norm``: ``mean_t |a_j| * ||W_down[:, j]||`` (token-weighted means from calibration);
  * ``weight``: ``||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||`` (GELU MLPs: no gate factor), data-free;
  * ``published``: the published BAGEL statistic, a per-layer scalar times ``||W_down[:, j]||``
    (so the ranking is the down-column norm alone);
  * ``random``: a seeded random ranking.
The MLP is read through the family adapter (``families.Family.mlp_weights``), so every family and
both MLP kinds (SwiGLU, GELU) are scored the same way.
"""

from __future__ import annotations

import torch

from .choices import WIDTH_SCORES as NEURON_SCORES
from .families import require_family


def neuron_scores(
    family, component: str, layer: int, score: str, calibration=None, seed: int = 0, slot: str | None = None
) -> torch.Tensor:
    """Scores [I] of the neurons of one dense MLP (``slot``: which MLP of the layer; default the first)."""
    slot = slot or require_family(family, "neuron_scores").mlp_slots(component)[0]
    weights = family.mlp_weights(component, layer, slot)
    if weights is None:
        raise ValueError(f"layer {layer} of {component!r} ({slot}) has no dense MLP to score")
    down_norm = weights.down.float().norm(dim=0)
    if score == "act_norm":
        if calibration is None:
            raise ValueError("score 'act_norm' needs calibration statistics")
        return calibration.act_abs_mean(component, layer, slot).to(down_norm.device).float() * down_norm
    if score == "weight":
        w = weights.up.float().norm(dim=1)
        if weights.gate is not None:
            w = weights.gate.float().norm(dim=1) * w
        return w * down_norm
    if score == "published":
        scalar = float(calibration.published_scalar(component, slot)[layer]) if calibration is not None else 1.0
        return scalar * down_norm
    if score == "random":
        stream = family.components.index(component) + 2 * family.mlp_slots(component).index(slot)
        g = torch.Generator().manual_seed(seed * 1000 + layer * 2 + stream)
        return torch.rand(down_norm.shape[0], generator=g)
    raise ValueError(f"unknown neuron score {score!r}; expected one of {NEURON_SCORES}")
