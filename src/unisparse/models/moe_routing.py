"""The routing sort shared by the sync-free MoE dispatch (``moe_block``) and its Triton kernels
(``moe_triton``), kept apart so that neither imports the other for it."""

from __future__ import annotations

import torch


def route_plan(expert_idx, num_experts: int):
    """The sort behind the sync-free dispatches, with fixed-size ops only (no ``nonzero``,
    ``unique``, ``.item()``), so it never waits for the device and traces into one graph.

    Returns ``order`` [N*k] (flat pair index, ``token * k + slot``, in expert-then-token order),
    ``inverse`` [N*k] (the sorted position of each flat pair; a permutation, so un-permuting is a
    gather and needs no atomics) and ``ends`` [E] int32 (cumulative group sizes, the ``offs`` of
    a grouped GEMM; empty experts repeat the previous end).
    """
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.searchsorted(
        flat.index_select(0, order), torch.arange(num_experts, device=flat.device), right=True, out_int32=True
    )
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inverse, ends
