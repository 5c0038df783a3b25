"""What MoE tuning minimises on a batch: the rectified-flow loss on the data (``flow``), or the
student's velocity against the frozen dense teacher's at the same x_t, t and prompt (``distill``;
Dense2MoE's knowledge distillation, Router-KD's for routers only).

Both are built on the family's ``velocity_at``. Classifier-free-guidance dropout, noise and t are drawn
for the whole global batch from the loop's CPU generator (in that order, as the shapes world's batches
draw them), then the posterior noise of sampled latent targets; each process trains on its slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..choices import TUNE_OBJECTIVES


def noised_batch(family, n: int, cond_dropout: float, gen):
    """CFG keep mask [n], noise (``noise_shape``) and t [n] for a global batch of n."""
    keep = torch.rand(n, generator=gen) >= cond_dropout
    noise = torch.randn(*family.noise_shape(n), generator=gen)
    t = torch.sigmoid(torch.randn(n, generator=gen))
    return keep, noise, t


def latent_batch_loss(
    family, prompt_ids, mean, std, cfg: dict, gen, world, teacher=None, observer=None, sample: bool = True
):
    """The loss on this process's slice of a global batch of clean-latent posteriors.

    ``mean`` / ``std`` [n, L, D] fp32 (std None or zero: a deterministic target); ``sample``: draw
    the target ``mean + std * eps`` (BAGEL's trainer) rather than take the mean; ``teacher``: the dense
    family, needed by ``objective: distill``."""
    objective = cfg.get("objective", "flow")
    if objective not in TUNE_OBJECTIVES:
        raise ValueError(f"unknown tuning objective {objective!r}; expected one of {TUNE_OBJECTIVES}")
    n = len(prompt_ids)
    keep, noise, t = noised_batch(family, n, cfg["cond_dropout"], gen)
    eps = torch.randn(mean.shape, generator=gen) if sample and std is not None and bool((std != 0).any()) else None
    mine = world.slice(n)
    x0 = mean[mine] if eps is None else mean[mine] + std[mine] * eps[mine]
    noise, t, keep = noise[mine].to(torch.float32), t[mine], keep[mine]
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
    ids = prompt_ids[mine] if isinstance(mine, slice) else [prompt_ids[i] for i in mine]
    v = family.velocity_at(ids, x_t, t, cond_keep=keep, observer=observer)
    if objective == "flow":
        target = (noise - x0).to(v.device)
    else:
        if teacher is None:
            raise ValueError("tuning objective 'distill' needs the dense teacher model")
        with torch.no_grad():
            target = teacher.velocity_at(ids, x_t, t, cond_keep=keep).detach()
    return F.mse_loss(v, target.to(v.device, torch.float32))


def share_frozen(teacher, student, trainable: list[str]) -> int:
    """Make the teacher use the student's own tensors wherever they are the same frozen weight, so
    only the tuned component is held twice; returns how many parameters are shared. A parameter is
    shared when both models have it under one name, it is not trained, and the values are equal."""
    trained = set(trainable)
    mine = dict(student.model.named_parameters())
    shared = 0
    for name, p in list(teacher.model.named_parameters()):
        q = mine.get(name)
        if q is None or name in trained or q.shape != p.shape or q.dtype != p.dtype or q.device != p.device:
            continue
        if torch.equal(p.detach(), q.detach()):
            owner, _, attr = name.rpartition(".")
            module = teacher.model.get_submodule(owner) if owner else teacher.model
            setattr(module, attr, q)
            shared += 1
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    teacher.model.eval()
    return shared
