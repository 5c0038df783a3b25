"""The MLP blocks every family's components are made of, and a uniform view of their weights.

Two dense kinds (``MLP_KINDS``):
  * ``swiglu`` (Qwen2, BAGEL): ``down(silu(gate x) * up x)``, no biases;
  * ``gelu`` (diffusion transformers, e.g. Qwen-Image's MMDiT): ``down(gelu_tanh(up x + b_up)) + b_down``.
Both separate over neurons: the output is a sum of per-neuron terms (plus ``b_down`` once), which is
what makes width pruning a slice and an all-experts MoE the dense MLP exactly. ``MLPWeights`` is the
one description of a dense MLP the algorithms see (``families``); ``models.moe_block`` builds
experts from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

MLP_KINDS = ("swiglu", "gelu")


def activate(h, kind: str, size: int | None = None):
    """The neuron activations from the first projection's output ``h``: for ``swiglu`` h holds the
    gate rows then the up rows (``size`` each); for ``gelu`` h is the (biased) up projection."""
    if kind == "swiglu":
        return F.silu(h[..., :size]) * h[..., size:]
    if kind == "gelu":
        return F.gelu(h, approximate="tanh")
    raise ValueError(f"unknown MLP kind {kind!r}; expected one of {MLP_KINDS}")


class SwiGLUMLP(nn.Module):
    """Qwen2 MLP: ``down(silu(gate x) * up x)``; its width may differ per layer after pruning."""

    kind = "swiglu"

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, x, return_aux: bool = False):
        act = F.silu(self.gate_proj(x)) * self.up_proj(x)
        out = self.down_proj(act)
        return (out, {"act": act}) if return_aux else out


class GELUMLP(nn.Module):
    """Two-layer MLP of diffusion transformers: ``down(gelu_tanh(up x + b_up)) + b_down``.
    ``down_bias=False`` gives the bias-free variant an MoE's shared expert uses (the dense output
    bias is added once by the MoE block)."""

    kind = "gelu"

    def __init__(self, hidden_size: int, width: int, down_bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, width, bias=True)
        self.down_proj = nn.Linear(width, hidden_size, bias=down_bias)

    def forward(self, x, return_aux: bool = False):
        act = F.gelu(self.up_proj(x), approximate="tanh")
        out = self.down_proj(act)
        return (out, {"act": act}) if return_aux else out


@dataclass(frozen=True)
class MLPWeights:
    """A dense MLP's weights, whichever module holds them (shapes as in ``nn.Linear``):
    ``up`` [I, H], ``down`` [H, I]; ``gate`` [I, H] for swiglu; ``up_bias`` [I] and ``down_bias`` [H]
    for gelu (either may be None)."""

    kind: str
    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in MLP_KINDS:
            raise ValueError(f"unknown MLP kind {self.kind!r}; expected one of {MLP_KINDS}")
        if (self.kind == "swiglu") != (self.gate is not None):
            raise ValueError("a swiglu MLP has a gate projection and a gelu MLP has none")

    @property
    def width(self) -> int:
        return self.up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    def select(self, idx) -> "MLPWeights":
        """The MLP of neurons ``idx`` only (in that order): rows of gate/up (and up's bias), columns of
        down; the output bias is not per neuron and stays."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.up.device)
        return replace(
            self,
            up=self.up[idx],
            down=self.down[:, idx],
            gate=None if self.gate is None else self.gate[idx],
            up_bias=None if self.up_bias is None else self.up_bias[idx],
        )

    @classmethod
    def of(cls, module: nn.Module) -> "MLPWeights":
        """The weights of a ``SwiGLUMLP`` or ``GELUMLP`` (detached views, no copy)."""
        if isinstance(module, SwiGLUMLP):
            return cls(
                "swiglu",
                module.up_proj.weight.detach(),
                module.down_proj.weight.detach(),
                gate=module.gate_proj.weight.detach(),
            )
        if isinstance(module, GELUMLP):
            b = module.down_proj.bias
            return cls(
                "gelu",
                module.up_proj.weight.detach(),
                module.down_proj.weight.detach(),
                up_bias=module.up_proj.bias.detach(),
                down_bias=None if b is None else b.detach(),
            )
        raise TypeError(f"{type(module).__name__} is not a dense MLP block (SwiGLUMLP or GELUMLP)")

    def module(self) -> nn.Module:
        """A ``SwiGLUMLP`` / ``GELUMLP`` holding copies of these weights (same device and dtype; built
        on the meta device, so making it draws nothing from the global random generator)."""
        w = self.up
        with torch.device("meta"):
            m = (
                SwiGLUMLP(self.hidden_size, self.width)
                if self.kind == "swiglu"
                else GELUMLP(self.hidden_size, self.width, down_bias=self.down_bias is not None)
            )
        m = m.to_empty(device=w.device).to(dtype=w.dtype)
        if self.kind == "swiglu":
            pairs = [(m.gate_proj.weight, self.gate), (m.up_proj.weight, self.up), (m.down_proj.weight, self.down)]
        else:
            up_bias = self.up_bias if self.up_bias is not None else torch.zeros_like(self.up[:, 0])
            pairs = [(m.up_proj.weight, self.up), (m.up_proj.bias, up_bias), (m.down_proj.weight, self.down)]
            if self.down_bias is not None:
                pairs.append((m.down_proj.bias, self.down_bias))
        with torch.no_grad():
            for param, value in pairs:
                param.copy_(value)
        return m
