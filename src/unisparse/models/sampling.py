"""Sampler settings shared by every family's generation task: their names and defaults (one source for
evaluation and calibration settings) and classifier-free guidance with optional renormalisation."""

from __future__ import annotations

from ..choices import CFG_RENORM_TYPES, MOT_RENORMS  # noqa: F401  (MOT_RENORMS: the MoT's sampler checks it)

#: the sampler's settings and their defaults (the tiny default's; BAGEL's inferencer: 50 timesteps =
#: 49 steps, cfg 4, interval [0.4, 1] ([0, 1] for GenEval), global renormalisation with min 0); evaluation
#: and calibration settings carry these keys, and ``generate_images`` takes them as keyword arguments
SAMPLER_DEFAULTS = dict(num_steps=20, cfg_scale=3.0, cfg_interval=[0.0, 1.0], cfg_renorm="none", cfg_renorm_min=0.0)


def sampler_settings(spec: dict) -> dict:
    """The sampler's keyword arguments out of a stage's settings (missing keys: ``SAMPLER_DEFAULTS``)."""
    return {k: spec.get(k, v) for k, v in SAMPLER_DEFAULTS.items()}


def check_renorm(renorm: str, allowed=CFG_RENORM_TYPES) -> str:
    """``renorm`` if the sampler at hand has it (``allowed``: the MoT's ``MOT_RENORMS``), else a
    ValueError naming the choices."""
    if renorm not in allowed:
        raise ValueError(f"cfg_renorm {renorm!r} is not one of this sampler's {list(allowed)}")
    return renorm


def guided_velocity(v_c, v_u, scale: float, renorm: str = "none", renorm_min: float = 0.0):
    """Classifier-free guidance ``v_u + s (v_c - v_u)`` on [B, L, D] velocities, optionally
    renormalised: as BAGEL does, scaled down to the conditional velocity's norm, per sample over all its
    tokens (``global``) or per token (``channel``), by a factor of at least ``renorm_min``; or as
    QwenImagePipeline does (``pipeline``), rescaled per token to the conditional norm, up or down;
    ``none`` leaves it as is."""
    check_renorm(renorm)
    v = v_u + scale * (v_c - v_u)
    if renorm == "none":
        return v
    if renorm == "pipeline":
        return v * (v_c.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True))
    dims = (1, 2) if renorm == "global" else (2,)
    ratio = v_c.norm(dim=dims, keepdim=True) / (v.norm(dim=dims, keepdim=True) + 1e-8)
    return v * ratio.clamp(min=renorm_min, max=1.0)
