"""Model-level dense -> MoE conversion of one component's MLPs (the paper's expert partitioning)."""
from __future__ import annotations

import logging


from ..models import SUFFIX, check_component
from ..sizes import moe_layers
from ..prune.common import derived_config, restructure
from ..prune.width import neuron_scores
from .partition import dense_to_moe, partition_neurons

log = logging.getLogger(__name__)

ROUTERS = ("paper", "softmax")


def check_moe_request(model, component: str, num_experts: int, top_k: int, shared_size: int = 0) -> None:
    """Validate before any work: a clear error naming the bad value."""
    check_component(component)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    for i in range(model.config.num_hidden_layers):
        mlp = model.mlp(i, component)
        if mlp is None or not hasattr(mlp, "down_proj"):
            continue
        width = mlp.down_proj.weight.shape[1]
        if shared_size < 0 or shared_size >= width:
            raise ValueError(f"shared_size={shared_size} must be in [0, {width})")
        if (width - shared_size) % num_experts:
            raise ValueError(
                f"num_experts={num_experts} does not divide the {component} MLP width {width}"
                f"{f' minus shared_size {shared_size}' if shared_size else ''} (layer {i})")


def convert_to_moe(model, component: str, num_experts: int, top_k: int, method: str = "snake",
                   calibration=None, shared_size: int = 0, dense_layers="first_last", router: str = "paper",
                   importance: str = "act_norm", seed: int = 0):
    """A new model whose ``component`` MLPs (except ``dense_layers``) are MoE blocks with experts of
    equal width; with all experts active and unit weights it computes exactly the dense MLP."""
    check_moe_request(model, component, num_experts, top_k, shared_size)
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
    if model.config.moe.get(component):
        raise ValueError(f"the {component} component is already an MoE")
    L = model.config.num_hidden_layers
    layers = [i for i in moe_layers(L, dense_layers) if model.mlp(i, component) is not None]
    if not layers:
        raise ValueError("no layer left to convert")
    width = model.mlp(layers[0], component).down_proj.weight.shape[1]
    if any(model.mlp(i, component).down_proj.weight.shape[1] != width for i in layers):
        raise ValueError("MoE conversion needs the same MLP width in every converted layer")
    spec = {"layers": layers, "num_experts": num_experts, "top_k": top_k,
            "expert_size": (width - shared_size) // num_experts, "shared_size": shared_size,
            "router": router, "partition": method}
    converted = {}
    for i in layers:
        mlp = model.mlp(i, component)
        scores = neuron_scores(model, i, component, importance if calibration is not None else "weight", calibration)
        coact = calibration.coactivation(component, i) if (calibration is not None and method == "cluster") else None
        if method == "cluster" and coact is None:
            raise ValueError("cluster partitioning needs calibration with coactivation: true")
        shared_idx, expert_idx = partition_neurons(scores, num_experts, shared_size, method=method, seed=seed + i, coact=coact)
        converted[i] = dense_to_moe(mlp, shared_idx, expert_idx, spec)
        log.info("layer %d: %s -> %d experts of %d (+%d shared)", i, component, num_experts, spec["expert_size"], shared_size)
    prefix = "language_model.model.layers.{}.mlp" + SUFFIX[component] + "."

    def transform(state):
        state = {k: v for k, v in state.items()
                 if not any(k.startswith(prefix.format(i)) for i in layers)}
        for i, block in converted.items():
            for k, v in block.state_dict().items():
                state[prefix.format(i) + k] = v
        return state

    moe = dict(model.config.moe)
    moe[component] = spec
    return restructure(model, derived_config(model, moe=moe), transform)
