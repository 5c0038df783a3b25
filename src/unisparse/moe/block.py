"""A SwiGLU MLP split into routed experts (plus an optional always-on shared expert).

Experts are stored stacked, as transformers stores its MoE models (``experts.gate_up_proj``
[E, 2*I_e, H] with the gate rows first, ``experts.down_proj`` [E, H, I_e]), so grouped-GEMM
backends and converters apply. The router is ``gate`` (BAGEL's name), a bias-free linear map.

Routers (``spec["router"]``):
  * ``paper``: zero-initialised router, top-k on the raw logits, each chosen expert's output scaled
    by ``1 + logit``; at init the block is the plain sum of the chosen experts, which is what makes
    a dense -> MoE conversion start from the dense function.
  * ``softmax``: top-k of the softmax, renormalised over the chosen experts; router init N(0, 0.02);
    pair it with :func:`load_balancing_loss`.
The shared expert (if ``shared_size`` > 0) is scaled by ``1 + shared_expert_gate(x)`` (zero init)
for both routers.

Dispatch (``spec["dispatch"]``) only ever computes the chosen experts:
  * ``grouped`` (default): (token, slot) pairs sorted by expert; each non-empty expert reads its
    contiguous slice of the sorted token list, gathers those rows of x, runs its two matmuls on views
    of the stacked weights and adds its scaled output back. Fastest on CPU (see benchmarks/moe_mlp.py):
    per-expert gathers keep the intermediates cache-sized, and it issues few small ops.
  * ``grouped_mm``: one gather of all pairs and two ``torch.nn.functional.grouped_mm`` calls (the
    kernel transformers' ``grouped_mm`` experts backend uses; meant for GPUs).
  * ``loop``: the plain reference (``torch.where`` per expert), kept for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.modeling_mot import SwiGLUMLP

ROUTERS = ("paper", "softmax")
DISPATCHES = ("grouped", "grouped_mm", "loop")
SPEC_DEFAULTS = {"shared_size": 0, "router": "paper", "dispatch": "grouped"}


def make_moe_spec(
    layers,
    num_experts: int,
    top_k: int,
    expert_size: int,
    shared_size: int = 0,
    router: str = "paper",
    dispatch: str = "grouped",
) -> dict:
    """A validated, JSON-serialisable spec dict as stored in ``MoTConfig.moe[component]``."""
    spec = {
        "layers": sorted(int(i) for i in layers),
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "expert_size": int(expert_size),
        "shared_size": int(shared_size),
        "router": router,
        "dispatch": dispatch,
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
    return spec


# ---------------------------------------------------------------------------- dispatch kernels
def _swiglu(h, size: int):
    return F.silu(h[:, :size]) * h[:, size:]


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


def dispatch_grouped(x, expert_idx, expert_weights, gate_up, down):
    """Sum over each token's chosen experts of ``w * expert(x)``, computing only chosen experts.

    x: [N, H]; expert_idx: [N, k] long (distinct per row); expert_weights: [N, k];
    gate_up: [E, 2*I_e, H]; down: [E, H, I_e]. Differentiable in x, weights and both projections.
    """
    E, two_i, _ = gate_up.shape
    tok, w, counts = _sorted_pairs(expert_idx, expert_weights.to(x.dtype), E)
    y = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        t = tok[start : start + c]
        h = torch.mm(x.index_select(0, t), gate_up[e].t())
        act = _swiglu(h, two_i // 2) * w[start : start + c, None]  # scale the narrow side
        y.index_add_(0, t, torch.mm(act, down[e].t()))
        start += c
    return y


def dispatch_grouped_mm(x, expert_idx, expert_weights, gate_up, down):
    """Same result as :func:`dispatch_grouped` with one gather and two grouped-GEMM calls.

    The kernel wants every row stride to be a multiple of 16 bytes; for sizes that break this (or
    a PyTorch without ``grouped_mm``) the per-expert path computes the same thing instead.
    """
    E, two_i, hidden = gate_up.shape
    align = max(1, 16 // x.element_size())
    if not hasattr(F, "grouped_mm") or hidden % align or (two_i // 2) % align:
        return dispatch_grouped(x, expert_idx, expert_weights, gate_up, down)
    tok, w, counts = _sorted_pairs(expert_idx, expert_weights.to(x.dtype), E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = F.grouped_mm(x.index_select(0, tok), gate_up.transpose(1, 2), offs=offs)
    act = _swiglu(h, two_i // 2) * w[:, None]
    out = F.grouped_mm(act, down.transpose(1, 2), offs=offs)
    return torch.zeros_like(x).index_add_(0, tok, out)


def dispatch_loop(x, expert_idx, expert_weights, gate_up, down):
    """Reference: for each expert, find its tokens with ``torch.where``, compute, add back."""
    E, two_i, _ = gate_up.shape
    y = torch.zeros_like(x)
    for e in range(E):
        t, slot = torch.where(expert_idx == e)
        if t.numel() == 0:
            continue
        h = x[t] @ gate_up[e].t()
        out = _swiglu(h, two_i // 2) @ down[e].t()
        y = y.index_add(0, t, out * expert_weights[t, slot, None].to(x.dtype))
    return y


DISPATCH = {"grouped": dispatch_grouped, "grouped_mm": dispatch_grouped_mm, "loop": dispatch_loop}


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
    """E SwiGLU experts of width I_e, stacked in one tensor per projection."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int):
        super().__init__()
        self.num_experts, self.expert_size = num_experts, expert_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def expert(self, e: int, x):
        """Output of expert ``e`` alone on x (used by tests and analysis, not by dispatch)."""
        return _swiglu(x @ self.gate_up_proj[e].t(), self.expert_size) @ self.down_proj[e].t()


class MoEMLP(nn.Module):
    """Drop-in replacement for ``SwiGLUMLP`` built from a MoE spec dict (see :func:`make_moe_spec`)."""

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
        self.gate = nn.Linear(hidden_size, self.num_experts, bias=False)
        if self.router == "paper":
            nn.init.zeros_(self.gate.weight)
        else:
            nn.init.normal_(self.gate.weight, std=0.02)
        self.experts = MoEExperts(self.num_experts, hidden_size, self.expert_size)
        if self.shared_size:
            self.shared_expert = SwiGLUMLP(hidden_size, self.shared_size)
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
        }

    def route(self, router_logits):
        """(expert_idx [N, k], expert_weights [N, k]): the chosen experts and their output scales."""
        if self.router == "paper":
            logit, idx = router_logits.topk(self.top_k, dim=-1)
            return idx, 1.0 + logit
        probs = torch.softmax(router_logits.float(), dim=-1)
        p, idx = probs.topk(self.top_k, dim=-1)
        return idx, (p / p.sum(-1, keepdim=True)).to(router_logits.dtype)

    def forward(self, x, return_aux: bool = False):
        router_logits = self.gate(x)
        expert_idx, expert_weights = self.route(router_logits)
        y = DISPATCH[self.dispatch](x, expert_idx, expert_weights, self.experts.gate_up_proj, self.experts.down_proj)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x) * (1.0 + self.shared_expert_gate(x))
        if return_aux:
            return y, {"router_logits": router_logits, "expert_idx": expert_idx, "expert_weights": expert_weights}
        return y

    def active_parameter_fractions(self) -> dict[str, float]:
        """Fraction of each parameter a token uses: routed experts k/E, router and shared expert 1."""
        frac = {name: 1.0 for name, _ in self.named_parameters()}
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            frac[name] = self.top_k / self.num_experts
        return frac

    @classmethod
    def from_dense(cls, mlp: SwiGLUMLP, shared_idx, expert_idx, spec: dict) -> "MoEMLP":
        """Split a dense SwiGLU MLP by neuron indices, copying weights exactly.

        shared_idx: [S] neurons of the shared expert; expert_idx: [E, I_e] neurons of each expert.
        Sizes in ``spec`` must agree with the indices. Router weights get the router's init.
        """
        spec = check_spec(spec)
        expert_idx = torch.as_tensor(expert_idx, dtype=torch.long)
        shared_idx = torch.as_tensor(shared_idx, dtype=torch.long).reshape(-1)
        if expert_idx.dim() != 2:
            raise ValueError(f"expert_idx must be [num_experts, expert_size], got shape {tuple(expert_idx.shape)}")
        got = {"num_experts": expert_idx.shape[0], "expert_size": expert_idx.shape[1], "shared_size": shared_idx.numel()}
        bad = {k: (spec[k], v) for k, v in got.items() if spec[k] != v}
        if bad:
            raise ValueError(f"spec disagrees with the partition (spec, partition): {bad}")
        wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        width = wg.shape[0]
        used = torch.cat([shared_idx, expert_idx.reshape(-1)])
        if used.numel() and (used.min() < 0 or used.max() >= width):
            raise ValueError(f"neuron indices must lie in [0, {width})")
        hidden = wg.shape[1]
        moe = cls(hidden, spec).to(device=wg.device, dtype=wg.dtype)
        with torch.no_grad():
            ei = expert_idx.to(wg.device)
            moe.experts.gate_up_proj.copy_(torch.cat([wg[ei], wu[ei]], dim=1))  # [E, 2*I_e, H]
            moe.experts.down_proj.copy_(wd[:, ei].permute(1, 0, 2))  # [H, E, I_e] -> [E, H, I_e]
            if moe.shared_expert is not None:
                si = shared_idx.to(wg.device)
                moe.shared_expert.gate_proj.weight.copy_(wg[si])
                moe.shared_expert.up_proj.weight.copy_(wu[si])
                moe.shared_expert.down_proj.weight.copy_(wd[:, si])
        return moe
