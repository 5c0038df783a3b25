"""A dense MLP (``models.blocks``: SwiGLU or GELU) split into routed experts (plus an optional
always-on shared expert).

Experts are stored stacked, as transformers stores its MoE models: SwiGLU experts as
``experts.gate_up_proj`` [E, 2*I_e, H] (gate rows first), GELU experts as ``experts.up_proj``
[E, I_e, H] with ``experts.up_bias`` [E, I_e]; ``experts.down_proj`` [E, H, I_e] for both. A GELU
MLP's output bias is not per neuron: the block adds it once (``down_bias``). The router is ``gate``
(BAGEL's name), a bias-free linear map. Both kinds separate over neurons, so with every expert
active at weight 1 the block computes the dense MLP exactly.

Routers (``spec["router"]``):
  * ``paper``: zero-initialised router, top-k on the raw logits, each chosen expert's output scaled
    by ``1 + logit``; at init the block is the plain sum of the chosen experts, which is what makes
    a dense -> MoE conversion start from the dense function.
  * ``softmax``: top-k of the softmax, renormalised over the chosen experts; router init N(0, 0.02);
    pair it with :func:`load_balancing_loss`.
The shared expert (if ``shared_size`` > 0) is scaled by ``1 + shared_expert_gate(x)`` (zero init)
for both routers.

Dispatch (``spec["dispatch"]``): how the routed sum is computed. Every path computes the same sum
up to float rounding (tests/test_moe_dispatch.py: forward and gradients against ``loop``):
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
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import DISPATCHES, ROUTERS
from .blocks import GELUMLP, MLP_KINDS, MLPWeights, SwiGLUMLP, activate
from .moe_routing import route_plan

SPEC_DEFAULTS = {"shared_size": 0, "router": "paper", "dispatch": "auto", "activation": "swiglu"}


def make_moe_spec(
    layers,
    num_experts: int,
    top_k: int,
    expert_size: int,
    shared_size: int = 0,
    router: str = "paper",
    dispatch: str = SPEC_DEFAULTS["dispatch"],
    activation: str = SPEC_DEFAULTS["activation"],
) -> dict:
    """A validated, JSON-serialisable spec dict as a family's config stores it per component."""
    spec = {
        "layers": sorted(int(i) for i in layers),
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "expert_size": int(expert_size),
        "shared_size": int(shared_size),
        "router": router,
        "dispatch": dispatch,
        "activation": activation,
    }
    return check_spec(spec)


def check_spec(spec: dict) -> dict:
    """Fill defaults and fail with a message naming the key, instead of at the first matmul."""
    spec = {**SPEC_DEFAULTS, **spec}
    for key in ("num_experts", "top_k", "expert_size"):
        if key not in spec:
            raise ValueError(f"MoE spec is missing {key!r}")
    E, k = spec["num_experts"], spec["top_k"]
    if E < 1:
        raise ValueError(f"MoE spec: num_experts must be >= 1, got {E}")
    if not 1 <= k <= E:
        raise ValueError(f"MoE spec: top_k must be in [1, num_experts={E}], got {k}")
    if spec["expert_size"] < 1:
        raise ValueError(f"MoE spec: expert_size must be >= 1, got {spec['expert_size']}")
    if spec["shared_size"] < 0:
        raise ValueError(f"MoE spec: shared_size must be >= 0, got {spec['shared_size']}")
    if spec["router"] not in ROUTERS:
        raise ValueError(f"MoE spec: unknown router {spec['router']!r}; expected one of {ROUTERS}")
    if spec["dispatch"] not in DISPATCHES:
        raise ValueError(f"MoE spec: unknown dispatch {spec['dispatch']!r}; expected one of {DISPATCHES}")
    if spec["activation"] not in MLP_KINDS:
        raise ValueError(f"MoE spec: unknown activation {spec['activation']!r}; expected one of {MLP_KINDS}")
    return spec


# ---------------------------------------------------------------------------- dispatch kernels
def _expert_width(w1, kind: str) -> int:
    """I_e from the stacked first projection ([E, 2*I_e, H] for swiglu, [E, I_e, H] for gelu)."""
    return w1.shape[1] // 2 if kind == "swiglu" else w1.shape[1]


def _act(h, kind: str, w1, bias=None):
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
        act = _act(h, kind, gate_up, None if up_bias is None else up_bias[e]) * w[start : start + c, None]  # narrow side
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
    act = _act(h, kind, gate_up, bias) * w[:, None]
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
        act = _act(h, kind, gate_up, up_bias) * scale[:, :, None]  # [N, E, I_e], 0 for unchosen experts
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
    act = _act(h, kind, gate_up, bias) * w[:, None]
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
        out = _act(h, kind, gate_up, None if up_bias is None else up_bias[e]) @ down[e].t()
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


# ---------------------------------------------------------------------------- losses
def load_balancing_loss(router_logits, expert_idx, num_experts: int):
    """Switch-style balance loss ``E * sum_e f_e * P_e``: f_e the fraction of routed (token, slot)
    pairs sent to expert e, P_e the mean softmax probability of e. Equals 1 when perfectly balanced.
    Accepts one layer's tensors or several concatenated along the token axis."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    counts = torch.zeros(num_experts, device=router_logits.device).index_add_(
        0, expert_idx.reshape(-1), torch.ones(expert_idx.numel(), device=router_logits.device)
    )
    frac = counts / expert_idx.numel()
    return num_experts * (frac * probs.mean(0)).sum()


# ---------------------------------------------------------------------------- modules
class MoEExperts(nn.Module):
    """E experts of width I_e, stacked in one tensor per projection: SwiGLU ``gate_up_proj``
    [E, 2*I_e, H]; GELU ``up_proj`` [E, I_e, H] and ``up_bias`` [E, I_e]; both ``down_proj`` [E, H, I_e]."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, kind: str = "swiglu"):
        super().__init__()
        self.num_experts, self.expert_size, self.kind = num_experts, expert_size, kind
        if kind == "swiglu":
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
            nn.init.normal_(self.gate_up_proj, std=0.02)
        else:
            self.up_proj = nn.Parameter(torch.empty(num_experts, expert_size, hidden_size))
            self.up_bias = nn.Parameter(torch.zeros(num_experts, expert_size))
            nn.init.normal_(self.up_proj, std=0.02)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        nn.init.normal_(self.down_proj, std=0.02)

    @property
    def first(self):
        """The stacked first projection the dispatches take."""
        return self.gate_up_proj if self.kind == "swiglu" else self.up_proj

    @property
    def first_bias(self):
        return None if self.kind == "swiglu" else self.up_bias

    def expert(self, e: int, x):
        """Output of expert ``e`` alone on x (used by tests and analysis, not by dispatch)."""
        bias = None if self.kind == "swiglu" else self.up_bias[e]
        return _act(x @ self.first[e].t(), self.kind, self.first, bias) @ self.down_proj[e].t()


class MoEMLP(nn.Module):
    """Drop-in replacement for a dense MLP block built from a MoE spec dict (see :func:`make_moe_spec`;
    ``activation`` says the experts' kind)."""

    def __init__(self, hidden_size: int, spec: dict):
        super().__init__()
        spec = check_spec(spec)
        self.hidden_size = hidden_size
        self.num_experts = spec["num_experts"]
        self.top_k = spec["top_k"]
        self.expert_size = spec["expert_size"]
        self.shared_size = spec["shared_size"]
        self.router = spec["router"]
        self.dispatch = spec["dispatch"]
        self.kind = spec["activation"]
        self.gate = nn.Linear(hidden_size, self.num_experts, bias=False)
        if self.router == "paper":
            nn.init.zeros_(self.gate.weight)
        else:
            nn.init.normal_(self.gate.weight, std=0.02)
        self.experts = MoEExperts(self.num_experts, hidden_size, self.expert_size, self.kind)
        # a GELU MLP's output bias belongs to no neuron: added once, whatever the routing
        self.down_bias = nn.Parameter(torch.zeros(hidden_size)) if self.kind == "gelu" else None
        if self.shared_size:
            self.shared_expert = _dense_block(self.kind, hidden_size, self.shared_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
            nn.init.zeros_(self.shared_expert_gate.weight)
        else:
            self.shared_expert = self.shared_expert_gate = None
        # The zero inits above are part of the method (the block starts as the plain sum of chosen
        # experts); tell transformers' post_init not to overwrite them with its Linear init.
        for gate in (self.gate, self.shared_expert_gate):
            if gate is not None:
                gate._is_hf_initialized = True

    @property
    def spec(self) -> dict:
        """The sizes and options of this block (``layers`` is the config's business)."""
        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "expert_size": self.expert_size,
            "shared_size": self.shared_size,
            "router": self.router,
            "dispatch": self.dispatch,
            "activation": self.kind,
        }

    def route(self, router_logits):
        """(expert_idx [N, k], expert_weights [N, k]): the chosen experts and their output scales."""
        # sorted=False: the same chosen set (the selection step is the same; only the final sort of
        # the k slots by value is skipped, ~20% of topk's time on a CPU); no consumer needs the order
        if self.router == "paper":
            logit, idx = router_logits.topk(self.top_k, dim=-1, sorted=False)
            return idx, 1.0 + logit
        probs = torch.softmax(router_logits.float(), dim=-1)
        p, idx = probs.topk(self.top_k, dim=-1, sorted=False)
        return idx, (p / p.sum(-1, keepdim=True)).to(router_logits.dtype)

    def forward(self, x, return_aux: bool = False):
        router_logits = self.gate(x)
        expert_idx, expert_weights = self.route(router_logits)
        dispatch = self.dispatch
        if dispatch == "auto":
            dispatch = choose_dispatch(x, self.num_experts, self.top_k, self.expert_size)
        y = DISPATCH[dispatch](x, expert_idx, expert_weights, self.experts.first, self.experts.down_proj,
                               self.kind, self.experts.first_bias)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x) * (1.0 + self.shared_expert_gate(x))
        if self.down_bias is not None:
            y = y + self.down_bias
        if return_aux:
            return y, {"router_logits": router_logits, "expert_idx": expert_idx, "expert_weights": expert_weights}
        return y

    def active_parameter_fractions(self) -> dict[str, float]:
        """Fraction of each parameter a token uses: routed experts k/E, router and shared expert 1."""
        frac = {name: 1.0 for name, _ in self.named_parameters()}
        for name, _ in self.experts.named_parameters():
            frac["experts." + name] = self.top_k / self.num_experts
        return frac

    def router_parameter_names(self) -> list[str]:
        """Names (relative to this block) of the parameters an expert-frozen tuning trains."""
        return [n for n, _ in self.named_parameters() if n.startswith(("gate.", "shared_expert_gate."))]

    @classmethod
    def from_dense(cls, mlp, shared_idx, expert_idx, spec: dict) -> "MoEMLP":
        """Split a dense MLP (``MLPWeights``, or a ``SwiGLUMLP``/``GELUMLP`` module) by neuron
        indices, copying weights exactly.

        shared_idx: [S] neurons of the shared expert; expert_idx: [E, I_e] neurons of each expert.
        Sizes in ``spec`` must agree with the indices, and its ``activation`` with the MLP's kind.
        Router weights get the router's init.
        """
        weights = mlp if isinstance(mlp, MLPWeights) else MLPWeights.of(mlp)
        spec = check_spec({**spec, "activation": spec.get("activation", weights.kind)})
        if spec["activation"] != weights.kind:
            raise ValueError(f"spec activation {spec['activation']!r} disagrees with the MLP's kind {weights.kind!r}")
        expert_idx = torch.as_tensor(expert_idx, dtype=torch.long)
        shared_idx = torch.as_tensor(shared_idx, dtype=torch.long).reshape(-1)
        if expert_idx.dim() != 2:
            raise ValueError(f"expert_idx must be [num_experts, expert_size], got shape {tuple(expert_idx.shape)}")
        got = {"num_experts": expert_idx.shape[0], "expert_size": expert_idx.shape[1], "shared_size": shared_idx.numel()}
        bad = {k: (spec[k], v) for k, v in got.items() if spec[k] != v}
        if bad:
            raise ValueError(f"spec disagrees with the partition (spec, partition): {bad}")
        width, device, dtype = weights.width, weights.up.device, weights.up.dtype
        used = torch.cat([shared_idx, expert_idx.reshape(-1)])
        if used.numel() and (used.min() < 0 or used.max() >= width):
            raise ValueError(f"neuron indices must lie in [0, {width})")
        moe = cls(weights.hidden_size, spec).to(device=device, dtype=dtype)
        with torch.no_grad():
            ei = expert_idx.to(device)
            if weights.kind == "swiglu":
                moe.experts.gate_up_proj.copy_(torch.cat([weights.gate[ei], weights.up[ei]], dim=1))  # [E, 2*I_e, H]
            else:
                moe.experts.up_proj.copy_(weights.up[ei])
                if weights.up_bias is not None:
                    moe.experts.up_bias.copy_(weights.up_bias[ei])
                if weights.down_bias is not None:
                    moe.down_bias.copy_(weights.down_bias)
            moe.experts.down_proj.copy_(weights.down[:, ei].permute(1, 0, 2))  # [H, E, I_e] -> [E, H, I_e]
            if moe.shared_expert is not None:
                _copy_into(moe.shared_expert, replace(weights.select(shared_idx.to(device)), down_bias=None))
        return moe


def _copy_into(block: nn.Module, weights: MLPWeights) -> None:
    """Copy ``weights`` into a dense block of the same kind and sizes (no new module: no RNG draw)."""
    for name, value in (("gate_proj.weight", weights.gate), ("up_proj.weight", weights.up), ("up_proj.bias", weights.up_bias),
                        ("down_proj.weight", weights.down), ("down_proj.bias", weights.down_bias)):
        if value is not None:
            block.get_parameter(name).copy_(value)


def _dense_block(kind: str, hidden_size: int, width: int) -> nn.Module:
    """The shared expert: a dense block of the experts' kind, without an output bias."""
    return SwiGLUMLP(hidden_size, width) if kind == "swiglu" else GELUMLP(hidden_size, width, down_bias=False)
