"""MoE dispatch kernels: the routed sum over each token's chosen experts, several ways, and the
``auto`` rule that picks one (beside the block in ``moe_block``, as transformers keeps its MoE kernels
in ``integrations/moe.py``). Every path computes the same sum up to float rounding
(tests/test_moe_dispatch.py: forward and gradients against ``loop``); a block's
``spec["dispatch"]`` names one:
  * ``auto`` (default): picks one of the paths below from device, dtype and shape by a fixed rule
    (:func:`choose_dispatch`), never from timings.
  * ``dense_equivalent``: every expert on every token, weight 0 for the unchosen ones (plain GEMMs
    over the stacked weights; exact; the cheapest where routing overhead dominates: tiny experts,
    few tokens, k = E).
  * ``nosync``: the GPU dispatch, no host synchronisation (capturable by ``torch.compile``): a
    fixed-size sort of the (token, slot) pairs (:func:`route_plan`), one gather, two
    ``F.grouped_mm`` calls with the routing weight folded into the activation, un-permutation by a
    gather through the inverse permutation and a sum over the k slots (no atomics).
  * ``grouped``: pairs sorted by expert on the host; each non-empty expert gathers its rows, runs
    two matmuls on views of the stacked weights and adds its scaled output back. Syncs per expert;
    fastest on CPU for large token counts (per-expert gathers stay cache-sized).
  * ``grouped_mm``: host-sorted pairs, one gather, two ``F.grouped_mm`` calls, ``index_add_`` back.
  * ``triton``: optional Triton kernels (``moe_triton.py``; gather fused into the first GEMM,
    scatter into the second), CUDA inference only, opt-in (``auto`` never picks it); elsewhere it
    computes ``nosync``.
  * ``loop``: the plain reference (``torch.where`` per expert), the reference of truth for tests.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .blocks import activate
from .moe_routing import route_plan


def _expert_width(w1, kind: str) -> int:
    """I_e from the stacked first projection ([E, 2*I_e, H] for swiglu, [E, I_e, H] for gelu)."""
    return w1.shape[1] // 2 if kind == "swiglu" else w1.shape[1]


def expert_activation(h, kind: str, w1, bias=None):
    """Neuron activations of rows ``h`` of the first projection; ``bias``: the rows' first-projection
    bias (gelu experts), already gathered to h's rows."""
    if bias is not None:
        h = h + bias
    return activate(h, kind, _expert_width(w1, kind))


def _sorted_pairs(expert_idx, expert_weights, num_experts: int):
    """(token, weight) of every chosen (token, expert) pair, ordered by expert then token, and
    the per-expert counts. Built from a [N, E] selection mask and ``nonzero`` rather than a sort:
    a multi-threaded ``argsort`` is ~100x slower than this on a busy CPU."""
    N = expert_idx.shape[0]
    sel = torch.zeros(N, num_experts, dtype=torch.bool, device=expert_idx.device)
    sel.scatter_(1, expert_idx, True)
    pairs = sel.t().nonzero()  # row-major over [E, N]: sorted by expert, then token
    exp, tok = pairs[:, 0], pairs[:, 1]
    dense_w = expert_weights.new_zeros(N, num_experts).scatter(1, expert_idx, expert_weights)
    return tok, dense_w[tok, exp], sel.sum(0)


def dispatch_grouped(x, expert_idx, expert_weights, gate_up, down, kind="swiglu", up_bias=None):
    """Sum over each token's chosen experts of ``w * expert(x)``, computing only chosen experts.

    x: [N, H]; expert_idx: [N, k] long (distinct per row); expert_weights: [N, k];
    gate_up: the stacked first projection, [E, 2*I_e, H] (``kind`` swiglu) or [E, I_e, H] (gelu,
    with ``up_bias`` [E, I_e]); down: [E, H, I_e]. Differentiable in x, weights and all projections.
    Every dispatch takes the same arguments.
    """
    E = gate_up.shape[0]
    tok, w, counts = _sorted_pairs(expert_idx, expert_weights.to(x.dtype), E)
    y = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        t = tok[start : start + c]
        h = torch.mm(x.index_select(0, t), gate_up[e].t())
        act = (
            expert_activation(h, kind, gate_up, None if up_bias is None else up_bias[e]) * w[start : start + c, None]
        )  # narrow side
        y.index_add_(0, t, torch.mm(act, down[e].t()))
        start += c
    return y


def dispatch_grouped_mm(x, expert_idx, expert_weights, gate_up, down, kind="swiglu", up_bias=None):
    """Same result as :func:`dispatch_grouped` with one gather and two grouped-GEMM calls.

    The kernel wants every row stride to be a multiple of 16 bytes; for sizes that break this (or
    a PyTorch without ``grouped_mm``) the per-expert path computes the same thing instead.
    """
    E, _, hidden = gate_up.shape
    align = max(1, 16 // x.element_size())
    if not hasattr(F, "grouped_mm") or hidden % align or _expert_width(gate_up, kind) % align:
        return dispatch_grouped(x, expert_idx, expert_weights, gate_up, down, kind, up_bias)
    tok, w, counts = _sorted_pairs(expert_idx, expert_weights.to(x.dtype), E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = F.grouped_mm(x.index_select(0, tok), gate_up.transpose(1, 2), offs=offs)
    bias = None if up_bias is None else up_bias.repeat_interleave(counts, dim=0)
    act = expert_activation(h, kind, gate_up, bias) * w[:, None]
    out = F.grouped_mm(act, down.transpose(1, 2), offs=offs)
    return torch.zeros_like(x).index_add_(0, tok, out)


def dispatch_dense_equivalent(x, expert_idx, expert_weights, gate_up, down, kind="swiglu", up_bias=None):
    """Every expert on every token, the unchosen ones with weight 0: the same sum as the sparse
    dispatches (exactly, up to float rounding; the gradients too, since an unchosen expert's
    activations are multiplied by a constant 0), at the dense MLP's cost plus the router.

    Plain GEMMs over the stacked weights and no data-dependent shape: no host sync, one graph under
    ``torch.compile``. It wins wherever routing overhead dominates (narrow experts, few tokens, k
    close to E) and is what a sync-free dispatch falls back to where no grouped GEMM can run:
    without knowing the largest expert load on the host, a batched GEMM must reserve room for
    every token in every expert, which costs the same FLOPs as this. Layout choices (measured on
    CPU): experts narrower than 16 get their (small) gate/up weights regrouped into all gate rows
    then all up rows, so SwiGLU runs on contiguous halves; the down projection is one GEMM over a
    [H, E*I_e] copy of the down weights, or a batched GEMM and a sum over experts while there are
    fewer tokens than an expert's width (then the copy would cost more than the [E, N, H] sum).
    """
    E, two_i, hidden = gate_up.shape
    size = _expert_width(gate_up, kind)
    N = x.shape[0]
    scale = x.new_zeros(N, E).scatter_(1, expert_idx, expert_weights.to(x.dtype))  # [N, E]
    if kind == "swiglu" and size < 16:
        w = gate_up.view(E, 2, size, hidden).transpose(0, 1).reshape(2 * E * size, hidden)
        act = activate(torch.mm(x, w.t()), kind, E * size).view(N, E, size) * scale[:, :, None]
    else:
        h = torch.mm(x, gate_up.reshape(E * two_i, hidden).t()).view(N, E, two_i)
        act = expert_activation(h, kind, gate_up, up_bias) * scale[:, :, None]  # [N, E, I_e], 0 for unchosen experts
    if N < size:
        return torch.bmm(act.transpose(0, 1), down.transpose(1, 2)).sum(0)
    return torch.mm(act.reshape(N, E * size), down.transpose(0, 1).reshape(hidden, E * size).t())


def _grouped_mm_usable(x, gate_up, kind: str = "swiglu") -> bool:
    """Whether ``F.grouped_mm`` runs here as one kernel without a host sync: CPU (any float
    dtype in eager mode, its grouped GEMM loops over groups on the host where the offsets already
    live; bf16 only while torch.compile traces, whose shape rule for the op demands bf16) or CUDA
    with bf16 on compute capability >= 8.0; and 16-byte-aligned row strides in all operands."""
    if not hasattr(F, "grouped_mm") or x.dtype != gate_up.dtype:
        return False
    hidden = gate_up.shape[2]
    align = max(1, 16 // x.element_size())
    if hidden % align or _expert_width(gate_up, kind) % align:
        return False
    if x.device.type == "cpu":  # under torch.compile the op's fake-tensor rule accepts bf16 only
        return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and _cuda_capability(x.device) >= (8, 0)
    return False


_CAPABILITY: dict = {}


def _cuda_capability(device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def dispatch_nosync(x, expert_idx, expert_weights, gate_up, down, kind="swiglu", up_bias=None):
    """The GPU dispatch: sort the (token, slot) pairs by expert (:func:`route_plan`), gather the
    rows of x once, two grouped GEMMs with the routing weight folded into the expert activation
    (the narrow side) before the down projection, then un-permute by a gather through the inverse
    permutation and sum the k slots of each token (no ``index_add_``/``index_put``, no atomics).

    No host synchronisation anywhere, so it can be captured by ``torch.compile`` (tested on CPU
    with ``fullgraph=True``). Where ``F.grouped_mm`` cannot run as one sync-free kernel (fp32/fp16
    on CUDA, pre-Ampere GPUs, unaligned sizes) it computes :func:`dispatch_dense_equivalent`.
    """
    if not _grouped_mm_usable(x, gate_up, kind):
        return dispatch_dense_equivalent(x, expert_idx, expert_weights, gate_up, down, kind, up_bias)
    E, _, hidden = gate_up.shape
    N, k = expert_idx.shape
    if N == 0:  # (a shape, not data: no sync) grouped GEMM kernels need at least one row
        return x.new_zeros(0, hidden)
    order, inverse, ends = route_plan(expert_idx, E)
    xs = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    w = expert_weights.reshape(-1).index_select(0, order).to(x.dtype)
    h = F.grouped_mm(xs, gate_up.transpose(1, 2), offs=ends)
    bias = None if up_bias is None else up_bias.index_select(0, expert_idx.reshape(-1).index_select(0, order))
    act = expert_activation(h, kind, gate_up, bias) * w[:, None]
    out = F.grouped_mm(act, down.transpose(1, 2), offs=ends)  # [N*k, H], sorted by expert
    return out.index_select(0, inverse).view(N, k, hidden).sum(1)


def dispatch_triton(x, expert_idx, expert_weights, gate_up, down, kind="swiglu", up_bias=None):
    """Triton kernels (``moe_triton.py``, ScatterMoE's idea: the gather of x fused into the
    first grouped GEMM, SwiGLU and the routing weight into its epilogue, the scatter back to
    (token, slot) order into the second's). Inference only and CUDA only: with autograd
    recording, or off CUDA, or without the ``triton`` package, it computes :func:`dispatch_nosync`.
    Not chosen by ``auto``: opt in with ``dispatch: triton``."""
    if kind == "swiglu" and (x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        try:
            from . import moe_triton as triton_dispatch  # lazy: triton is imported only here, only for CUDA
        except ImportError:
            triton_dispatch = None  # (the kernels fuse SwiGLU: GELU experts take nosync)
        if triton_dispatch is not None and triton_dispatch.usable(x, expert_weights, gate_up, down):
            return triton_dispatch.moe_forward(x, expert_idx, expert_weights, gate_up, down)
    return dispatch_nosync(x, expert_idx, expert_weights, gate_up, down, kind, up_bias)


def dispatch_loop(x, expert_idx, expert_weights, gate_up, down, kind="swiglu", up_bias=None):
    """Reference: for each expert, find its tokens with ``torch.where``, compute, add back."""
    E = gate_up.shape[0]
    y = torch.zeros_like(x)
    for e in range(E):
        t, slot = torch.where(expert_idx == e)
        if t.numel() == 0:
            continue
        h = x[t] @ gate_up[e].t()
        out = expert_activation(h, kind, gate_up, None if up_bias is None else up_bias[e]) @ down[e].t()
        y = y.index_add(0, t, out * expert_weights[t, slot, None].to(x.dtype))
    return y


# Thresholds of the ``auto`` rule on the CPU, from a sweep of shapes (hidden 64-1024, widths
# 32-4096, 16-to-8 and 32-to-16, 8-8192 tokens; fp32, 2 threads, quiet 2-core x86 box): below
# either minimum the dense-equivalent GEMMs were never more than ~10% slower than the best sparse
# path and usually faster; above the gather size the per-expert path won (1.90x vs 1.46x dense at
# 1024x4096, 4096 tokens), below it the single gather (1.39x vs 0.95x at 256 tokens).
AUTO_CPU_MIN_EXPERT_SIZE = 64  # narrower experts: routing costs more than the skipped FLOPs
AUTO_CPU_MIN_WORK = 1 << 29  # N * H * E * I_e: fewer multiply-adds per projection, ditto
AUTO_CPU_MAX_GATHER_BYTES = 32 << 20  # above this, one [N*k, H] gather spills the caches


def choose_dispatch(x, num_experts: int, top_k: int, expert_size: int) -> str:
    """The ``auto`` rule: a fixed function of device, dtype and shape (never of timings, so a
    given input always takes the same path; every path computes the same sum up to rounding).

    * k == E: ``dense_equivalent`` (nothing to skip).
    * CUDA, and any device while torch.compile traces: ``nosync`` (sync-free, capturable; it
      computes ``dense_equivalent`` itself where no sync-free grouped GEMM runs, e.g. fp32 on CUDA
      or pre-Ampere GPUs).
    * CPU and other devices: ``dense_equivalent`` while routing overhead dominates, i.e. experts
      narrower than ``AUTO_CPU_MIN_EXPERT_SIZE`` or fewer than ``AUTO_CPU_MIN_WORK``
      multiply-adds per projection (N * H * E * I_e); otherwise ``grouped_mm`` (one gather, two
      grouped GEMMs), or ``grouped`` (per-expert gathers that stay cache-sized) once the gathered
      rows (N*k*H elements) take more than ``AUTO_CPU_MAX_GATHER_BYTES``.
    """
    if top_k == num_experts:
        return "dense_equivalent"
    if x.device.type == "cuda" or torch.compiler.is_compiling():
        return "nosync"
    n, hidden = x.shape
    if expert_size < AUTO_CPU_MIN_EXPERT_SIZE or n * hidden * num_experts * expert_size < AUTO_CPU_MIN_WORK:
        return "dense_equivalent"
    if n * top_k * hidden * x.element_size() > AUTO_CPU_MAX_GATHER_BYTES:
        return "grouped"
    return "grouped_mm"


DISPATCH = {
    "dense_equivalent": dispatch_dense_equivalent,
    "nosync": dispatch_nosync,
    "grouped": dispatch_grouped,
    "grouped_mm": dispatch_grouped_mm,
    "triton": dispatch_triton,
    "loop": dispatch_loop,
}
