"""Model-level dense -> MoE conversion of one component's MLPs (the paper's expert partitioning),
through the family adapter: every dense MLP of the component (SwiGLU or GELU; each MLP slot of a
layer) outside ``dense_layers`` becomes an MoE block of equal-width experts."""

from __future__ import annotations

import logging

from ..families import family_for, like_given, require_family
from ..importance import neuron_scores
from ..models.moe_block import ROUTERS, make_moe_spec
from ..sizes import check_partition_sizes, moe_layers
from .partition import dense_to_moe, partition_neurons

log = logging.getLogger(__name__)


def check_moe_request(
    family,
    component: str,
    num_experts: int,
    top_k: int,
    shared_size: int = 0,
    router: str = "paper",
    dense_layers="first_last",
) -> list[int]:
    """Validate before any work (a clear error naming the bad value); returns the layers to convert.
    Every converted MLP must be dense and of one width that ``num_experts`` (after ``shared_size``)
    divides."""
    require_family(family, "check_moe_request").check_component(component)
    if not 1 <= top_k <= max(num_experts, 1):
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
    if family.moe_spec(component):
        raise ValueError(f"the {component} component is already an MoE")
    layers = [
        i
        for i in moe_layers(family.num_layers(component), dense_layers)
        if any(family.mlp(component, i, s) is not None for s in family.mlp_slots(component))
    ]
    if not layers:
        raise ValueError("no layer left to convert")
    widths = {family.mlp_weights(component, i, s).width for i, s in family.mlp_places(component) if i in layers}
    if len(widths) > 1:
        raise ValueError(f"MoE conversion needs the same MLP width in every converted layer, found {sorted(widths)}")
    for width in widths:
        try:
            check_partition_sizes(width, num_experts, shared_size)
        except ValueError as e:
            raise ValueError(f"{component} MLP: {e}") from None
    return layers


def convert_to_moe(
    model,
    component: str,
    num_experts: int,
    top_k: int,
    method: str = "snake",
    calibration=None,
    shared_size: int = 0,
    dense_layers="first_last",
    router: str = "paper",
    importance: str = "act_norm",
    seed: int = 0,
):
    """A new family whose ``component`` MLPs (except ``dense_layers``) are MoE blocks with experts of
    equal width; with all experts active and unit weights it computes exactly the dense MLP (a
    ``Family`` for a ``Family``, a bare model for a bare model)."""
    family = family_for(model)
    layers = check_moe_request(family, component, num_experts, top_k, shared_size, router, dense_layers)
    places = [(i, s) for i, s in family.mlp_places(component) if i in layers]
    width = family.mlp_weights(component, *places[0]).width
    kind = family.mlp_weights(component, *places[0]).kind
    expert_size = check_partition_sizes(width, num_experts, shared_size)
    spec = {
        **make_moe_spec(layers, num_experts, top_k, expert_size, shared_size, router, activation=kind),
        "partition": method,
    }
    spec.pop("dispatch")  # the block's default applies unless a user sets one
    if kind == "swiglu":
        spec.pop("activation")  # the default kind: configs written before GELU experts existed stay valid
    mlps = {}
    for i, slot in places:
        scores = neuron_scores(
            family, component, i, importance if calibration is not None else "weight", calibration, slot=slot
        )
        coact = (
            calibration.coactivation(component, i, slot) if (calibration is not None and method == "cluster") else None
        )
        if method == "cluster" and coact is None:
            raise ValueError("cluster partitioning needs calibration with coactivation: true")
        shared_idx, expert_idx = partition_neurons(
            scores, num_experts, shared_size, method=method, seed=seed + i, coact=coact
        )
        mlps[(component, i, slot)] = dense_to_moe(family.mlp_weights(component, i, slot), shared_idx, expert_idx, spec)
        log.info(
            "layer %d %s: %s -> %d experts of %d (+%d shared)",
            i,
            slot,
            component,
            num_experts,
            expert_size,
            shared_size,
        )
    return like_given(family.rebuild(mlps=mlps, moe={component: spec}), model)
