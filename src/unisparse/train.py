"""Train the embedded default: a tiny MoT on the shapes world, both tasks jointly.

Each step samples a QA batch and a generation batch from the training split: cross-entropy on the
one-token answer plus the rectified-flow loss, run by the one training loop (``trainloop``).
Deterministic from the seed on one device for a fixed thread count; resumable; sharded under torchrun.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from . import tasks
from .families import family_for
from .io import save_model
from .models.configuration_mot import MoTConfig
from .models.modeling_mot import MoTForUnifiedModel
from .spec import merge_spec
from .trainloop import lr_at, run_training  # noqa: F401  (lr_at: part of this module's API)
from .worlds import shapes

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = dict(
    seed=0,
    steps=3000,
    batch_und=32,
    batch_gen=32,
    lr=1e-3,
    weight_decay=0.0,
    warmup_frac=0.05,
    min_lr_frac=0.05,
    cond_dropout=0.1,
    grad_clip=1.0,
    threads=2,
    checkpoint_every=500,  # steps between resumable checkpoints (with a checkpoint directory)
    qa_weights=None,  # sampling weights of the ShapesQA types (colour, shape, count, relation)
)


#: model sizes a training run may set (the rest is fixed by the world or by pruning)
MODEL_SPEC_KEYS = (
    "hidden_size",
    "intermediate_size",
    "gen_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "vit_patch_size",
    "vit_hidden_size",
    "latent_patch_size",
    "time_embed_dim",
    "timestep_shift",
)


def check_model_spec(model_spec: dict) -> MoTConfig:
    """The config a model spec gives, or a ValueError naming an unknown key or an impossible size
    (MoTConfig alone would keep an unknown key as an attribute and ignore it)."""
    unknown = sorted(set(model_spec) - set(MODEL_SPEC_KEYS))
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; known: {list(MODEL_SPEC_KEYS)}")
    bad = [
        f"{k}={v!r}"
        for k, v in model_spec.items()
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0
    ]
    if bad:
        raise ValueError(f"model sizes must be finite positive numbers: {', '.join(bad)}")
    sizes = dict(model_spec)
    gen_width = sizes.pop("gen_intermediate_size", None)
    if gen_width is not None:  # a generation tower with its own MLP width (BAGEL's towers share one)
        sizes["mlp_widths"] = {"gen": [int(gen_width)] * int(sizes.get("num_hidden_layers", 4))}
    return MoTConfig(**{**sizes, **tasks.model_config_kwargs()})


def build_model(model_spec: dict, seed: int, device="cpu", dtype=torch.float32) -> MoTForUnifiedModel:
    """A freshly initialised model (same weights for the same seed on every device: built on the CPU
    in fp32, then moved)."""
    config = check_model_spec(model_spec)
    torch.manual_seed(seed)
    return MoTForUnifiedModel(config).to(device=device, dtype=dtype)


def train_tiny(
    model_spec: dict,
    train_spec: dict,
    out_dir: str | None = None,
    progress: bool = True,
    device="cpu",
    dtype=torch.float32,
    checkpoint_dir=None,
    stop_after: int | None = None,
) -> dict:
    """Train from scratch and write a ``save_pretrained`` directory atomically (on rank 0). Returns a
    summary; ``checkpoint_dir`` makes the run resumable."""
    cfg = merge_spec(TRAIN_DEFAULTS, train_spec, "training")
    torch.set_num_threads(int(cfg["threads"]))
    model = build_model(model_spec, cfg["seed"], device, dtype)
    family = family_for(model)

    def batch_loss(m, rng, gen, world):
        qa = [shapes.sample_qa(rng, "train", cfg["qa_weights"]) for _ in range(cfg["batch_und"])]
        images, questions, answers = tasks.qa_batch(qa)
        mine = world.slice(len(qa))
        logits = m.understanding_logits(images[mine], questions[mine])
        ce = F.cross_entropy(logits, answers[mine].to(logits.device))
        examples = [shapes.sample_gen_example(rng, "train") for _ in range(cfg["batch_gen"])]
        mse = tasks.gen_batch_loss(family.with_model(m), examples, cfg["cond_dropout"], gen, world)
        return ce + mse, {"ce": ce, "mse": mse}

    run = run_training(
        model,
        [n for n, p in model.named_parameters() if p.requires_grad],
        cfg,
        batch_loss,
        what="train-tiny",
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        stop_after=stop_after,
        log_every=100,
    )
    if out_dir is not None and run["is_main"]:
        save_model(model, out_dir)
        log.info("trained %d steps in %.1f s -> %s", cfg["steps"], run["seconds"], out_dir)
    return {
        "train_seconds": run["seconds"],
        "steps": cfg["steps"],
        "history": run["history"],
        "train": cfg,
        "resumed_from": run["resumed_from"],
        "processes": run["processes"],
    }
