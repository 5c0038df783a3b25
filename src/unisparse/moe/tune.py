"""MoE tuning on the rectified-flow loss: expert-frozen (routers only) or full (experts + routers).
The same full tuning of a dense or width-cut component gives the tuned controls.

Only the MoE component's MLP blocks ever train; everything else (understanding tower included)
stays frozen. The loop, checkpoints and resumption are the one training loop's (``trainloop``): a
killed run resumes from its last checkpoint, if that was made from the same input, and ends with
exactly the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import tasks
from ..choices import TUNING_MODES as MODES
from ..families import family_for, require_family
from ..models.moe_block import load_balancing_loss
from ..spec import merge_spec
from ..trainloop import run_training
from ..tune_settings import TUNE_DEFAULTS
from ..worlds import shapes
from .objectives import latent_batch_loss, share_frozen

log = logging.getLogger(__name__)


def trainable_names(family, component: str, mode: str) -> list[str]:
    """Parameters tuned in ``mode``: routers only (frozen) or the whole MoE blocks (full).

    On a component without experts, ``full`` tunes every (remaining) MLP of the component: the tuned
    controls (a dense or statically cut model given the MoE's loss, data, steps and learning rate), so
    a recovery can be told apart from what any fine-tuning buys."""
    require_family(family, "trainable_names").check_component(component)
    if mode not in MODES:
        raise ValueError(f"unknown tuning mode {mode!r}; expected one of {MODES}")
    spec = family.moe_spec(component)
    if not spec and mode != "full":
        raise ValueError(
            f"the {component} component has no routers to tune (mode 'frozen'); "
            "run `unisparse partition` first, or tune its MLPs with mode 'full'"
        )
    layers = set(spec["layers"]) if spec else None
    chosen = set()
    for layer, slot in family.mlp_places(component):
        if layers is not None and layer not in layers:
            continue  # a layer kept dense in an MoE component: not tuned
        block = family.mlp(component, layer, slot)
        if mode == "frozen" and not hasattr(block, "router_parameter_names"):
            continue  # a dense MLP in an MoE layer (a family may convert some slots only): no router
        routers = set(block.router_parameter_names()) if mode == "frozen" else None
        chosen.update(id(p) for n, p in block.named_parameters() if routers is None or n in routers)
    names = [name for name, p in family.model.named_parameters() if id(p) in chosen]
    if not names:
        raise ValueError(f"the {component} component has no MLP parameters left to tune")
    return names


class RouterCollector:
    """Observer that keeps each MoE layer's router logits and choices of one forward (for the
    balance loss and for expert-load statistics)."""

    def __init__(self):
        self.aux = []

    def on_layer(self, layer, component, h_in, attn_update, mlp_update, mlp_aux):
        if mlp_aux and "router_logits" in mlp_aux:
            self.aux.append((layer if "slot" not in mlp_aux else f"{layer}.{mlp_aux['slot']}", component, mlp_aux))


def shapes_examples(rng, n: int) -> list:
    """The embedded default's tuning data: ``n`` generation examples of the shapes world's training split."""
    return [shapes.sample_gen_example(rng, "train") for _ in range(n)]


def tune_moe(
    family,
    component: str,
    mode: str,
    spec: dict | None = None,
    checkpoint_dir=None,
    progress: bool = True,
    stop_after: int | None = None,
    examples=shapes_examples,
    data=None,
    teacher=None,
    input_digest: str | None = None,
) -> dict:
    """Tune in place with the one training loop (resumable; sharded under torchrun). ``stop_after``
    ends the run early (used to test resumption). A checkpoint in ``checkpoint_dir`` is resumed only
    if it was made from this very input model (content hash), the same data and the same settings.
    ``examples(rng, n)``: the training data, ``n`` (prompt, image) examples per call drawn with the
    loop's generator (as ``tasks.gen_batch_loss`` takes them); the shapes world by default.
    ``data``: prepared latents (``tunedata.latents.LatentSet``) to read instead, in the seeded order
    from ``spec["seed"]``; ``teacher``: the dense family the ``distill`` objective compares with (its
    frozen weights become the student's own, so only the tuned component is held twice)."""
    family = family_for(family)
    cfg = merge_spec(TUNE_DEFAULTS, spec, "tuning")
    check_objective(cfg, teacher)
    torch.set_num_threads(int(cfg["threads"]))
    names = trainable_names(family, component, mode)
    router_spec = family.moe_spec(component)  # None for a dense or width-cut control
    reader = None
    if data is not None:
        from ..tunedata.latents import LatentReader

        data.check_model(family)
        reader = LatentReader(data, cfg["seed"])
    if teacher is not None:
        teacher = require_family(teacher, "tune_moe")
        from ..distributed import is_sharded

        if is_sharded(family.model):  # the teacher stays whole on each rank beside the sharded student
            log.info("distillation teacher held whole beside the sharded student (its tensors are not shared)")
        else:
            shared = share_frozen(teacher, family, names)
            log.info("distillation teacher shares %d frozen tensors with the student", shared)

    def batch_loss(m, rng, gen, world):
        collector = RouterCollector() if cfg["balance_coef"] and router_spec else None
        student = family.with_model(m)
        if reader is not None:
            mean, std, ids = reader.batch(cfg["batch_gen"])
            loss = latent_batch_loss(
                student, ids, mean, std, cfg, gen, world, teacher, collector, sample=cfg["latent"] == "sample"
            )
        elif cfg["objective"] == "distill":  # the shapes world's images, encoded on the fly
            ids, images = tasks.gen_batch(examples(rng, cfg["batch_gen"]), family.encode)
            with torch.no_grad():
                mean, _ = family.latent_moments(images)
            loss = latent_batch_loss(student, ids, mean.cpu(), None, cfg, gen, world, teacher, collector)
        else:
            batch = examples(rng, cfg["batch_gen"])
            loss = tasks.gen_batch_loss(student, batch, cfg["cond_dropout"], gen, world, observer=collector)
        if collector is not None:
            bal = sum(
                load_balancing_loss(a["router_logits"], a["expert_idx"], router_spec["num_experts"])
                for _, _, a in collector.aux
            )
            loss = loss + cfg["balance_coef"] * bal / max(1, len(collector.aux))
        return loss, {"loss": loss}

    run = run_training(
        family.model,
        names,
        cfg,
        batch_loss,
        what=f"{mode} tuning",
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        stop_after=stop_after,
        log_every=50,
        data=reader,
        family=family,
        input_digest=input_digest,
    )
    return {
        "mode": mode,
        "component": component,
        "trainable": len(names),
        "seconds": run["seconds"],
        "history": run["history"],
        "tune": cfg,
        "resumed_from": run["resumed_from"],
        "processes": run["processes"],
        **({"data": {"sha256": data.digest, "examples": len(data)}} if data is not None else {}),
    }


def check_objective(cfg: dict, teacher) -> None:
    """Refuse an unknown objective or latent target, and ``distill`` without a teacher."""
    from ..choices import LATENT_TARGETS, TUNE_OBJECTIVES

    if cfg["objective"] not in TUNE_OBJECTIVES:
        raise ValueError(f"tuning setting objective={cfg['objective']!r}: expected one of {TUNE_OBJECTIVES}")
    if cfg["latent"] not in LATENT_TARGETS:
        raise ValueError(f"tuning setting latent={cfg['latent']!r}: expected one of {LATENT_TARGETS}")
    if cfg["objective"] == "distill" and teacher is None:
        raise ValueError("tuning objective 'distill' needs the dense teacher model (tune-moe --teacher DIR)")


def expert_load(family, component: str, items: int = 64, num_steps: int = 10, seed: int = 0) -> dict:
    """Fraction of routed tokens per expert and layer (``layer.slot`` where a layer has several MLPs)
    while sampling evaluation prompts, with the coefficient of variation (0 = perfectly balanced)."""
    family = family_for(family)
    pairs = shapes.geneval_set("eval", 1, None, seed)[:items]
    collector = RouterCollector()
    family.generate_images(
        [family.encode(p.text) for p, _ in pairs], [s for _, s in pairs], num_steps=num_steps, observer=collector
    )
    E = family.moe_spec(component)["num_experts"]
    counts: dict = {}
    for layer, comp, aux in collector.aux:
        if comp == component:
            counts[layer] = (
                counts.get(layer, 0) + torch.bincount(aux["expert_idx"].reshape(-1), minlength=E).float().cpu()
            )
    per_layer = {str(i): (c / c.sum()).tolist() for i, c in sorted(counts.items())}
    cv = [float(c.std() / c.mean()) for c in counts.values()]
    used = [float((c > 0).float().mean()) for c in counts.values()]
    return {"per_layer": per_layer, "cv_mean": float(np.mean(cv)), "experts_used_frac": float(np.mean(used))}
