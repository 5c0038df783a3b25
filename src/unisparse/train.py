"""Train the embedded default: a tiny MoT on the shapes world, both tasks jointly, on CPU.

One plain loop (nanoGPT style): sample a QA batch and a generation batch from the training split,
cross-entropy on the one-token answer plus the rectified-flow loss, AdamW with a one-cycle schedule.
Deterministic from the seed for a fixed thread count.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import tasks
from .io import save_model
from .spec import merge_spec
from .models import MoTConfig, MoTForUnifiedModel
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
    qa_weights=None,  # sampling weights of the ShapesQA types (colour, shape, count, relation)
)


def lr_at(step: int, steps: int, lr: float, warmup_frac: float, min_lr_frac: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr`` (one cycle)."""
    warm = max(1, int(steps * warmup_frac))
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


#: model sizes a training run may set (the rest is fixed by the world or by pruning)
MODEL_SPEC_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "vit_patch_size",
                   "vit_hidden_size", "latent_patch_size", "time_embed_dim", "timestep_shift")


def check_model_spec(model_spec: dict) -> MoTConfig:
    """The config a model spec gives, or a ValueError naming an unknown key or an impossible size
    (MoTConfig alone would keep an unknown key as an attribute and ignore it)."""
    unknown = sorted(set(model_spec) - set(MODEL_SPEC_KEYS))
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; known: {list(MODEL_SPEC_KEYS)}")
    bad = [f"{k}={v!r}" for k, v in model_spec.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0]
    if bad:
        raise ValueError(f"model sizes must be positive numbers: {', '.join(bad)}")
    return MoTConfig(**{**model_spec, **tasks.model_config_kwargs()})


def build_model(model_spec: dict, seed: int) -> MoTForUnifiedModel:
    config = check_model_spec(model_spec)
    torch.manual_seed(seed)
    return MoTForUnifiedModel(config)


def train_tiny(model_spec: dict, train_spec: dict, out_dir: str, progress: bool = True) -> dict:
    """Train from scratch and write a ``save_pretrained`` directory atomically. Returns a summary."""
    cfg = merge_spec(TRAIN_DEFAULTS, train_spec, "training")
    torch.set_num_threads(int(cfg["threads"]))
    model = build_model(model_spec, cfg["seed"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg["weight_decay"])
    rng = np.random.default_rng(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    t0 = time.time()
    history = []
    bar = tqdm(range(cfg["steps"]), desc="train-tiny", disable=not progress, mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup_frac"], cfg["min_lr_frac"])
        qa = [shapes.sample_qa(rng, "train", cfg["qa_weights"]) for _ in range(cfg["batch_und"])]
        images, questions, answers = tasks.qa_batch(qa)
        ce = F.cross_entropy(model.understanding_logits(images, questions), answers)
        prompts = [shapes.sample_gen_example(rng, "train")[0] for _ in range(cfg["batch_gen"])]
        ids, gimages = tasks.gen_batch(prompts)
        keep = torch.rand(len(prompts), generator=gen) >= cfg["cond_dropout"]
        mse = model.flow_loss(ids, gimages, cond_keep=keep, generator=gen)
        loss = ce + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        if step % 100 == 0 or step == cfg["steps"] - 1:
            history.append({"step": step, "ce": ce.item(), "mse": mse.item()})
            bar.set_postfix(ce=f"{ce.item():.3f}", mse=f"{mse.item():.3f}")
            log.info("step %d ce %.4f mse %.4f", step, ce.item(), mse.item())
    seconds = time.time() - t0
    model.eval()
    save_model(model, out_dir)
    log.info("trained %d steps in %.1f s -> %s", cfg["steps"], seconds, out_dir)
    return {"train_seconds": seconds, "steps": cfg["steps"], "history": history, "train": cfg}
