"""Dense -> MoE conversion of SwiGLU MLPs: expert partitioning, the MoE block and its dispatch."""
from .block import (
    DISPATCHES,
    ROUTERS,
    MoEExperts,
    MoEMLP,
    check_spec,
    dispatch_grouped,
    dispatch_grouped_mm,
    dispatch_loop,
    load_balancing_loss,
    make_moe_spec,
)
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
    "dense_to_moe",
    "dispatch_grouped",
    "dispatch_grouped_mm",
    "dispatch_loop",
    "load_balancing_loss",
    "make_moe_spec",
    "partition_neurons",
]
