"""Sampler settings shared by every family's generation task: their names and defaults (one source for
evaluation and calibration settings) and classifier-free guidance with optional renormalisation."""
from __future__ import annotations

from ..choices import CFG_RENORM_TYPES

#: the renormalisations of BAGEL's sampler (``pipeline`` is the Qwen-Image family's)
MOT_RENORMS = tuple(r for r in CFG_RENORM_TYPES if r != "pipeline")

#: the sampler's settings and their defaults (the tiny default's; BAGEL's inferencer: 50 timesteps =
#: 49 steps, cfg 4, interval [0.4, 1] ([0, 1] for GenEval), global renormalisation with min 0); evaluation
#: and calibration settings carry these keys, and ``generate_images`` takes them as keyword arguments
SAMPLER_DEFAULTS = dict(num_steps=20, cfg_scale=3.0, cfg_interval=[0.0, 1.0], cfg_renorm="none", cfg_renorm_min=0.0)


def sampler_settings(spec: dict) -> dict:
    """The sampler's keyword arguments out of a stage's settings (missing keys: ``SAMPLER_DEFAULTS``)."""
    return {k: spec.get(k, v) for k, v in SAMPLER_DEFAULTS.items()}


def guided_velocity(v_c, v_u, scale: float, renorm: str = "none", renorm_min: float = 0.0):
    """Classifier-free guidance ``v_u + s (v_c - v_u)``, optionally renormalised as BAGEL does: scaled
    down to the conditional velocity's norm, per sample over all its tokens (``global``) or per token
    (``channel``), by a factor of at least ``renorm_min``; ``none`` leaves it as is."""
    if renorm not in CFG_RENORM_TYPES or renorm == "pipeline":
        raise ValueError(f"cfg_renorm {renorm!r} is not one of this sampler's {MOT_RENORMS}")
    v = v_u + scale * (v_c - v_u)
    if renorm == "none":
        return v
    dims = (1, 2) if renorm == "global" else (2,)
    ratio = v_c.norm(dim=dims, keepdim=True) / (v.norm(dim=dims, keepdim=True) + 1e-8)
    return v * ratio.clamp(min=renorm_min, max=1.0)
