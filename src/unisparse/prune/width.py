"""Width reduction: keep the top fraction of MLP neurons of a component in every layer.

Neurons are ranked by an importance score (``importance.NEURON_SCORES``: ``act_norm`` by default,
``weight``, ``published``, ``random``). Pruned neurons are physically removed (rows of gate/up and
up's bias, columns of down); the family's config records the widths. Every MLP of the component is
cut (an MMDiT block's image and text MLPs alike), SwiGLU and GELU the same way.
"""

from __future__ import annotations

import torch

from ..choices import WIDTH_SCORES  # noqa: F401  (re-exported)
from ..families import family_for, like_given
from ..importance import neuron_scores


def kept_neurons(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices (ascending) of the top ``keep_ratio`` neurons; ties broken by lower index."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    n = scores.shape[0]
    k = max(1, int(round(n * keep_ratio)))
    order = sorted(range(n), key=lambda j: (-float(scores[j]), j))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def prune_width(model, component: str, keep_ratio: float, score: str = "act_norm", calibration=None, seed: int = 0):
    """A new model whose ``component`` MLPs keep ``keep_ratio`` of their neurons in every layer
    (a ``Family`` for a ``Family``, a bare model for a bare model)."""
    family = family_for(model)
    family.check_component(component)
    if family.moe_spec(component):
        raise ValueError(f"the {component} component is an MoE: width pruning cuts dense MLPs")
    mlps = {}
    for layer, slot in family.mlp_places(component):  # dropped by depth pruning: nothing to cut
        idx = kept_neurons(neuron_scores(family, component, layer, score, calibration, seed, slot), keep_ratio)
        mlps[(component, layer, slot)] = family.mlp_weights(component, layer, slot).select(idx)
    return like_given(family.rebuild(mlps=mlps), model)
