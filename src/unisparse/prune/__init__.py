"""Training-free structural pruning: depth (drop sublayers) and width (drop MLP neurons)."""

from ..importance import neuron_scores
from .depth import GRANULARITIES, SCORE_DEFINITIONS, drop_scores, prune_depth
from .width import WIDTH_SCORES, prune_width

__all__ = [
    "GRANULARITIES",
    "SCORE_DEFINITIONS",
    "drop_scores",
    "prune_depth",
    "WIDTH_SCORES",
    "neuron_scores",
    "prune_width",
]
