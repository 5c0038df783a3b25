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

Dispatch (``spec["dispatch"]``): how the routed sum is computed; the kernels and the ``auto`` rule live
in ``moe_dispatch`` (registered in its ``DISPATCH``), so this module reads as the reference: the
block's ``forward`` is routing, one dispatch call, the shared expert.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..choices import DISPATCHES, ROUTERS
from .blocks import GELUMLP, MLP_KINDS, MLPWeights, SwiGLUMLP
from .moe_dispatch import DISPATCH, choose_dispatch, expert_activation

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
        return expert_activation(x @ self.first[e].t(), self.kind, self.first, bias) @ self.down_proj[e].t()


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
        y = DISPATCH[dispatch](
            x,
            expert_idx,
            expert_weights,
            self.experts.first,
            self.experts.down_proj,
            self.kind,
            self.experts.first_bias,
        )
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
        got = {
            "num_experts": expert_idx.shape[0],
            "expert_size": expert_idx.shape[1],
            "shared_size": shared_idx.numel(),
        }
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
    for name, value in (
        ("gate_proj.weight", weights.gate),
        ("up_proj.weight", weights.up),
        ("up_proj.bias", weights.up_bias),
        ("down_proj.weight", weights.down),
        ("down_proj.bias", weights.down_bias),
    ):
        if value is not None:
            block.get_parameter(name).copy_(value)


def _dense_block(kind: str, hidden_size: int, width: int) -> nn.Module:
    """The shared expert: a dense block of the experts' kind, without an output bias."""
    return SwiGLUMLP(hidden_size, width) if kind == "swiglu" else GELUMLP(hidden_size, width, down_bias=False)
