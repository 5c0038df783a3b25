"""Parameter and FLOP accounting per component: total, active (MoE: only the chosen experts).
Which parameter belongs to which component is the family's knowledge (``Family.parameter_component``)."""

from __future__ import annotations

from torch import nn

from .families import family_for


def _active_fraction(module: nn.Module) -> dict[str, float]:
    """Per-parameter active fraction contributed by MoE modules (1.0 elsewhere)."""
    fractions: dict[str, float] = {}
    for mname, mod in module.named_modules():
        active = getattr(mod, "active_parameter_fractions", None)
        if callable(active):
            for pname, frac in active().items():
                fractions[f"{mname}.{pname}" if mname else pname] = frac
    return fractions


def parameter_counts(family) -> dict:
    """{'total': {...}, 'active': {...}} parameter counts per component, ``shared`` and overall."""
    family = family_for(family)
    fractions = _active_fraction(family.model)
    total = {c: 0 for c in (*family.components, "shared")}
    active = dict(total)
    for name, p in family.model.named_parameters():
        c = family.parameter_component(name)
        total[c] += p.numel()
        active[c] += p.numel() * fractions.get(name, 1.0)
    total["all"] = sum(total.values())
    active["all"] = sum(active.values())
    return {"total": total, "active": {k: int(round(v)) for k, v in active.items()}}


def flops_per_token(family) -> dict:
    """Matmul FLOPs per token of each component through its layers (2 x active weights of its
    linear layers; attention-score FLOPs, which depend on sequence length, are left out)."""
    family = family_for(family)
    fractions = _active_fraction(family.model)
    flops = {c: 0.0 for c in family.components}
    for name, p in family.model.named_parameters():
        if not family.in_layers(name) or p.dim() < 2:
            continue
        flops[family.parameter_component(name)] += 2.0 * p.numel() * fractions.get(name, 1.0)
    return {c: int(round(v)) for c, v in flops.items()}
