"""Width reduction: keep the top fraction of MLP neurons of a component in every layer.

Scores per neuron j of a layer:
  * ``act_norm`` (default): ``mean_t |a_j| * ||W_down[:, j]||`` with token-weighted means;
  * ``weight``: ``||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||``, data-free;
  * ``published``: the published BAGEL statistic, a per-layer scalar times ``||W_down[:, j]||``
    (so the ranking is the down-column norm alone);
  * ``random``: a seeded random ranking.
Pruned neurons are physically removed (gate/up rows, down columns); the config records the widths.
"""
from __future__ import annotations

import torch

from ..models import SUFFIX, check_component
from .common import derived_config, restructure

WIDTH_SCORES = ("act_norm", "weight", "published", "random")


def neuron_scores(model, layer: int, component: str, score: str, calibration=None, seed: int = 0) -> torch.Tensor:
    mlp = model.mlp(layer, component)
    if mlp is None or not hasattr(mlp, "down_proj"):
        raise ValueError(f"layer {layer} of {component!r} has no dense MLP to prune")
    down_norm = mlp.down_proj.weight.detach().float().norm(dim=0)
    if score == "act_norm":
        if calibration is None:
            raise ValueError("score 'act_norm' needs calibration statistics")
        return calibration.act_abs_mean(component, layer).to(down_norm.device).float() * down_norm
    if score == "weight":
        w = mlp.gate_proj.weight.detach().float().norm(dim=1) * mlp.up_proj.weight.detach().float().norm(dim=1)
        return w * down_norm
    if score == "published":
        scalar = float(calibration.published_scalar(component)[layer]) if calibration is not None else 1.0
        return scalar * down_norm
    if score == "random":
        g = torch.Generator().manual_seed(seed * 1000 + layer * 2 + (component == "gen"))
        return torch.rand(down_norm.shape[0], generator=g)
    raise ValueError(f"unknown width score {score!r}; expected one of {WIDTH_SCORES}")


def kept_neurons(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices (ascending) of the top ``keep_ratio`` neurons; ties broken by lower index."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    n = scores.shape[0]
    k = max(1, int(round(n * keep_ratio)))
    order = sorted(range(n), key=lambda j: (-float(scores[j]), j))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def prune_width(model, component: str, keep_ratio: float, score: str = "act_norm", calibration=None, seed: int = 0):
    """A new model whose ``component`` MLPs keep ``keep_ratio`` of their neurons in every layer."""
    check_component(component)
    L = model.config.num_hidden_layers
    keep: dict[int, torch.Tensor] = {}
    widths = [model.config.mlp_width(component, i) for i in range(L)]
    for i in range(L):
        if model.mlp(i, component) is None:
            continue  # dropped by depth pruning
        keep[i] = kept_neurons(neuron_scores(model, i, component, score, calibration, seed), keep_ratio)
        widths[i] = len(keep[i])
    prefix = "language_model.model.layers.{}.mlp" + SUFFIX[component] + "."

    def transform(state):
        state = dict(state)
        for i, idx in keep.items():
            p = prefix.format(i)
            state[p + "gate_proj.weight"] = state[p + "gate_proj.weight"][idx]
            state[p + "up_proj.weight"] = state[p + "up_proj.weight"][idx]
            state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, idx]
        return state

    mlp_widths = dict(model.config.mlp_widths)
    mlp_widths[component] = widths
    return restructure(model, derived_config(model, mlp_widths=mlp_widths), transform)
