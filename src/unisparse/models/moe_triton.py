"""Optional Triton kernels for the MoE forward (inference), ScatterMoE's idea in two kernels.

Only :func:`unisparse.models.moe_dispatch.dispatch_triton` imports this module, and only when asked for
(``dispatch: triton``); ``triton`` itself is imported here, so a CPU install never needs it.

The (token, slot) pairs are sorted by expert with the same sync-free plan as ``nosync``
(:func:`unisparse.models.moe_routing.route_plan`); the sorted list is cut into blocks of ``BLOCK_M`` rows
that never straddle two experts. A fixed grid of ``ceil(N*k / BLOCK_M) + E`` row blocks (an upper
bound of the blocks needed, whatever the routing) is launched, and each program reads its expert
and row range from a small table built on the device, so nothing waits for the host:

1. ``_gate_up_kernel``: gathers the rows of x by token index while loading the A tile (no
   gathered copy of x in memory), multiplies by the expert's gate and up rows, and applies
   ``silu(gate) * up * routing weight`` in the epilogue; writes the activations [N*k, I_e] in
   sorted order.
2. ``_down_kernel``: multiplies the sorted activations by the expert's down projection and stores
   each row straight at its (token, slot) position (the scatter fused into the store), so the
   result is [N, k, H] in token order; the sum over the k slots is one torch reduction
   (deterministic: no atomics).

Accumulation is in fp32 (fp32 inputs use IEEE products, not TF32). Inference only: no backward
kernels; ``dispatch_triton`` computes the ``nosync`` dispatch whenever autograd is recording.

Status: checked for agreement with the reference loop in Triton's interpreter on a CPU
(``TRITON_INTERPRET=1``, tests/test_moe_dispatch.py); block sizes are untuned and the kernels have
not yet been run or timed on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .moe_routing import route_plan

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(x, expert_weights, gate_up, down) -> bool:
    """CUDA tensors (or CPU tensors under Triton's interpreter), one float dtype, no autograd."""
    tensors = (x, expert_weights, gate_up, down)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if x.dtype not in DTYPES or gate_up.dtype != x.dtype or down.dtype != x.dtype:
        return False
    return x.device.type == "cuda" or (interpreting() and x.device.type == "cpu")


@triton.jit
def _gate_up_kernel(
    x_ptr,
    gu_ptr,
    w_ptr,
    order_ptr,
    row0_ptr,
    row1_ptr,
    expert_ptr,
    act_ptr,
    H,
    I,  # noqa: E741 (the MLP width, as in the kernels' notation)
    TOP_K,
    stride_xn,
    stride_xh,
    stride_ge,
    stride_gi,
    stride_gh,
    stride_an,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = tl.load(row0_ptr + pid_m)
    row1 = tl.load(row1_ptr + pid_m)
    if row0 >= row1:  # an idle block of the fixed grid
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row1
    pair = tl.load(order_ptr + rows, mask=rmask, other=0)
    tok = (pair // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < I
    rk = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_base = gu_ptr + e * stride_ge
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        kmask = kk < H
        a = tl.load(
            x_ptr + tok[:, None] * stride_xn + kk[None, :] * stride_xh, mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        bmask = kmask[:, None] & cmask[None, :]
        bg = tl.load(g_base + cols[None, :] * stride_gi + kk[:, None] * stride_gh, mask=bmask, other=0.0)
        bu = tl.load(g_base + (cols + I)[None, :] * stride_gi + kk[:, None] * stride_gh, mask=bmask, other=0.0)
        if IEEE:
            acc_g += tl.dot(a, bg, input_precision="ieee")
            acc_u += tl.dot(a, bu, input_precision="ieee")
        else:
            acc_g += tl.dot(a, bg)
            acc_u += tl.dot(a, bu)
    wgt = tl.load(w_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
    act = acc_g * tl.sigmoid(acc_g) * acc_u * wgt[:, None]
    tl.store(
        act_ptr + rows[:, None].to(tl.int64) * stride_an + cols[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


@triton.jit
def _down_kernel(
    act_ptr,
    dn_ptr,
    order_ptr,
    row0_ptr,
    row1_ptr,
    expert_ptr,
    out_ptr,
    H,
    I,  # noqa: E741 (the MLP width, as in the kernels' notation)
    stride_an,
    stride_de,
    stride_dh,
    stride_di,
    stride_on,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = tl.load(row0_ptr + pid_m)
    row1 = tl.load(row1_ptr + pid_m)
    if row0 >= row1:
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row1
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < H
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    d_base = dn_ptr + e * stride_de
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + rk
        kmask = kk < I
        a = tl.load(
            act_ptr + rows[:, None].to(tl.int64) * stride_an + kk[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        b = tl.load(
            d_base + cols[None, :] * stride_dh + kk[:, None] * stride_di,
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tl.store(
        out_ptr + pair[:, None] * stride_on + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


def block_table(ends, num_pairs: int, block_m: int):
    """Per row block of the fixed grid: its expert and [row0, row1) range in the sorted pair list;
    idle blocks get row0 == row1 == 0. All on the device, from the group ends alone."""
    E = ends.numel()
    ends = ends.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    nblk = (ends - starts + block_m - 1) // block_m
    blk_end = torch.cumsum(nblk, 0)
    grid_m = triton.cdiv(num_pairs, block_m) + E
    pid = torch.arange(grid_m, device=ends.device)
    expert = torch.searchsorted(blk_end, pid, right=True)
    live = expert < E
    e = expert.clamp(max=E - 1)
    first = pid - (blk_end[e] - nblk[e])
    row0 = torch.where(live, starts[e] + first * block_m, 0)
    row1 = torch.where(live, torch.minimum(row0 + block_m, ends[e]), 0)
    return e.to(torch.int32), row0.to(torch.int32), row1.to(torch.int32), grid_m


def moe_forward(x, expert_idx, expert_weights, gate_up, down):
    """Sum over each token's chosen experts of ``w * expert(x)`` (same contract as the other
    dispatches); no autograd."""

    E, two_i, H = gate_up.shape
    size = two_i // 2
    N, k = expert_idx.shape
    if N == 0:
        return x.new_zeros(0, H)
    x = x.contiguous()
    order, _, ends = route_plan(expert_idx, E)
    expert, row0, row1, grid_m = block_table(ends, N * k, BLOCK_M)
    w = expert_weights.reshape(-1).to(x.dtype).contiguous()
    act = torch.empty(N * k, size, device=x.device, dtype=x.dtype)
    out = torch.empty(N * k, H, device=x.device, dtype=x.dtype)
    ieee = x.dtype == torch.float32
    _gate_up_kernel[(grid_m, triton.cdiv(size, BLOCK_N))](
        x,
        gate_up,
        w,
        order,
        row0,
        row1,
        expert,
        act,
        H,
        size,
        k,
        x.stride(0),
        x.stride(1),
        gate_up.stride(0),
        gate_up.stride(1),
        gate_up.stride(2),
        act.stride(0),
        IEEE=ieee,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    _down_kernel[(grid_m, triton.cdiv(H, BLOCK_N))](
        act,
        down,
        order,
        row0,
        row1,
        expert,
        out,
        H,
        size,
        act.stride(0),
        down.stride(0),
        down.stride(1),
        down.stride(2),
        out.stride(0),
        IEEE=ieee,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return out.view(N, k, H).sum(1)
