"""Parameter and FLOP accounting per component: total, active (MoE: only the chosen experts)."""
from __future__ import annotations

from torch import nn

from .models import COMPONENTS


def component_of(param_name: str) -> str:
    """``gen`` for the generation tower (``*_moe_gen``), ``und`` for the understanding tower,
    ``shared`` for embeddings, heads, vision encoder, codec projections and time embeddings."""
    if "_moe_gen" in param_name:
        return "gen"
    if param_name.startswith("language_model.model.layers.") or param_name.startswith("language_model.model.norm."):
        return "und"
    return "shared"


def _active_fraction(module: nn.Module) -> dict[str, float]:
    """Per-parameter active fraction contributed by MoE modules (1.0 elsewhere)."""
    fractions: dict[str, float] = {}
    for mname, mod in module.named_modules():
        active = getattr(mod, "active_parameter_fractions", None)
        if callable(active):
            for pname, frac in active().items():
                fractions[f"{mname}.{pname}" if mname else pname] = frac
    return fractions


def parameter_counts(model: nn.Module) -> dict:
    """{'total': {...}, 'active': {...}} parameter counts per component and overall."""
    fractions = _active_fraction(model)
    total = {c: 0 for c in (*COMPONENTS, "shared")}
    active = dict(total)
    for name, p in model.named_parameters():
        c = component_of(name)
        total[c] += p.numel()
        active[c] += p.numel() * fractions.get(name, 1.0)
    total["all"] = sum(total.values())
    active["all"] = sum(active.values())
    return {"total": total, "active": {k: int(round(v)) for k, v in active.items()}}


def flops_per_token(model: nn.Module) -> dict:
    """Matmul FLOPs per token of each tower through the decoder layers (2 x active weights of its
    linear layers; attention-score FLOPs, which depend on sequence length, are left out)."""
    fractions = _active_fraction(model)
    flops = {c: 0.0 for c in COMPONENTS}
    for name, p in model.named_parameters():
        if not name.startswith("language_model.model.layers.") or p.dim() < 2:
            continue
        flops[component_of(name)] += 2.0 * p.numel() * fractions.get(name, 1.0)
    return {c: int(round(v)) for c, v in flops.items()}
