"""Dense -> MoE conversion of SwiGLU and GELU MLPs: expert partitioning, the MoE block and its dispatch."""

from ..models.moe_block import DISPATCHES, ROUTERS, MoEExperts, MoEMLP, check_spec, load_balancing_loss, make_moe_spec
from ..models.moe_dispatch import (
    choose_dispatch,
    dispatch_dense_equivalent,
    dispatch_grouped,
    dispatch_grouped_mm,
    dispatch_loop,
    dispatch_nosync,
)
from ..models.moe_routing import route_plan
from .partition import PARTITION_METHODS, balanced_kmeans, check_partition_sizes, dense_to_moe, partition_neurons

__all__ = [
    "DISPATCHES",
    "ROUTERS",
    "PARTITION_METHODS",
    "MoEExperts",
    "MoEMLP",
    "balanced_kmeans",
    "check_partition_sizes",
    "check_spec",
    "choose_dispatch",
    "dense_to_moe",
    "dispatch_dense_equivalent",
    "dispatch_grouped",
    "dispatch_grouped_mm",
    "dispatch_loop",
    "dispatch_nosync",
    "load_balancing_loss",
    "make_moe_spec",
    "partition_neurons",
    "route_plan",
]
