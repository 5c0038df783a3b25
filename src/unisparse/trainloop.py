"""The one training loop, used by train-tiny and by MoE tuning: plain (nanoGPT-style), resumable,
deterministic on one device, sharded with FSDP2 under torchrun.

A caller gives the model, the names of the parameters to train, the settings and a ``batch_loss``
function that draws one global batch from the loop's generators and returns this process's loss
(fp32) on its slice of it. The loop owns everything else: AdamW with a one-cycle schedule, gradient
clipping, the loss history, checkpoints, resumption and sharding.

Checkpoints hold the trained parameters, the optimizer state and the generators' states in
safetensors + JSON (no pickle), written atomically every ``checkpoint_every`` steps with the hash of
the run's input model, of its data source and of its settings. A checkpoint is resumed only when all
of them match (otherwise training starts over and the log says why); a resumed run ends with the
weights and the loss history an uninterrupted run reaches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import distributed
from .codemap import module_sources
from .io import NonFiniteError, aside_copies, atomic_path, sha256_file, state_digest
from .worlds import shapes

log = logging.getLogger(__name__)

#: settings every caller's spec provides (its defaults carry them)
LOOP_KEYS = ("steps", "lr", "weight_decay", "warmup_frac", "min_lr_frac", "grad_clip", "seed")


def lr_at(step: int, steps: int, lr: float, warmup_frac: float, min_lr_frac: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr`` (one cycle)."""
    warm = max(1, int(steps * warmup_frac))
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def data_digest() -> str:
    """Identity of the training data: the sources of the world that generates it (every module of
    ``worlds`` the ``worlds.shapes`` facade draws on, so an edit to any of them is a different world)."""
    h = hashlib.sha256()
    for path in module_sources(shapes.__name__):
        if Path(path).parent.name == "worlds":  # the world's modules (not the package's version or choices)
            h.update(f"{Path(path).name}:{sha256_file(path)}\n".encode())
    return h.hexdigest()


def check_trainable_dtype(dtype, what: str) -> None:
    """Refuse float16 parameters before any work: AdamW's update in float16 divides by
    ``sqrt(v) + eps`` where both underflow to 0 (eps 1e-8 is below float16's smallest subnormal,
    6e-8), so the weights turn inf/NaN within steps on every device; no loss scale fixes the
    optimizer's own arithmetic. bfloat16 has float32's range; float16 stays fine for inference."""
    if dtype in (torch.float16, "float16"):
        raise ValueError(
            f"{what}: dtype float16 cannot train (AdamW's eps and second moments underflow in float16 "
            "and the weights become NaN); train in bfloat16 or float32 (evaluation may use float16)"
        )


def check_finite_weights(model, names, what: str) -> None:
    """Every trained parameter finite, else ``NonFiniteError`` naming the first few."""
    params = dict(model.named_parameters())
    bad = [n for n in names if not bool(torch.isfinite(params[n].detach()).all())]
    if bad:
        raise NonFiniteError(
            f"{what}: {len(bad)} trained tensor(s) hold non-finite values ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}); nothing was saved"
        )


def _step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, w) -> bool:
    """Whether this step's loss and gradient norm are finite on every process (one flag all-reduced
    under torchrun, so all ranks stop together instead of one waiting in a collective)."""
    grad_norm = distributed.full_tensor(grad_norm) if w.sharded else grad_norm
    bad = (~torch.isfinite(loss.detach().float())).float() + (~torch.isfinite(grad_norm.detach().float())).float()
    if w.sharded:
        bad = bad.reshape(1).clone()
        torch.distributed.all_reduce(bad)
    return not bool(bad.sum() > 0)


class Checkpoint:
    """``<dir>/last``: the state of a run at a step, and what the run was made from."""

    def __init__(self, directory, provenance: dict):
        self.path = Path(directory) / "last"
        self.source = self.path  # where ``resumable`` found the checkpoint to resume
        self.provenance = provenance

    def save(self, step: int, params: dict, names, opt, rng, gen, history: list, world, data=None) -> None:
        tensors = {f"param.{n}": distributed.full_tensor(params[n].detach()).cpu().contiguous() for n in names}
        for i, p in enumerate(opt.param_groups[0]["params"]):
            for k, v in opt.state.get(p, {}).items():
                v = v if torch.is_tensor(v) else torch.tensor(v)
                tensors[f"opt.{i}.{k}"] = distributed.full_tensor(v.detach()).cpu().clone().contiguous()
        tensors["rng.torch"] = gen.get_state()
        if world.is_main:
            with atomic_path(self.path, is_dir=True) as tmp:
                save_file(tensors, str(tmp / "state.safetensors"))
                meta = {
                    "step": step,
                    "numpy_rng": rng.bit_generator.state,
                    "history": history,
                    "state_sha256": sha256_file(tmp / "state.safetensors"),
                    **({"data_position": data.state()} if data is not None else {}),
                    **self.provenance,
                }
                (tmp / "meta.json").write_text(json.dumps(meta))
        world.barrier()

    def resumable(self) -> tuple[dict | None, str]:
        """The checkpoint's meta if it may be resumed, else None and why not. A run interrupted while
        it replaced ``last`` leaves the previous checkpoint moved aside: that one is resumed then."""
        self.source = self.path
        if not self.path.exists():
            for aside in aside_copies(self.path):
                if (aside / "meta.json").is_file():
                    log.info("resuming from %s: %s was being replaced when the run stopped", aside, self.path)
                    self.source = aside
                    break
        try:
            meta = json.loads((self.source / "meta.json").read_text())
        except (OSError, ValueError) as e:
            return None, f"its meta.json is unreadable ({e})"
        for key, what in (
            ("input_model_sha256", "another input model"),
            ("data_sha256", "other training data"),
            ("spec", "other settings"),
            ("names", "other trainable parameters"),
        ):
            if meta.get(key) != self.provenance[key]:
                return None, f"it was made from {what}"
        state = self.source / "state.safetensors"
        if not state.is_file() or sha256_file(state) != meta.get("state_sha256"):
            return None, "its state.safetensors is missing or corrupted"
        return meta, ""

    def load(self, meta: dict, params: dict, names, opt, rng, gen, data=None) -> None:
        tensors = load_file(str(self.source / "state.safetensors"))
        with torch.no_grad():
            for n in names:
                params[n].copy_(distributed.shard_like(tensors[f"param.{n}"], params[n]))
        for i, p in enumerate(opt.param_groups[0]["params"]):
            state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if state:
                opt.state[p] = {k: (v if k == "step" else distributed.shard_like(v, p)) for k, v in state.items()}
        gen.set_state(tensors["rng.torch"])
        rng.bit_generator.state = meta["numpy_rng"]
        if data is not None:
            data.restore(meta["data_position"])


def run_training(
    model,
    names: list[str],
    cfg: dict,
    batch_loss: Callable,
    *,
    what: str,
    checkpoint_dir=None,
    progress: bool = True,
    stop_after: int | None = None,
    log_every: int = 50,
    data=None,
) -> dict:
    """Train ``names`` of ``model`` in place for ``cfg["steps"]`` steps.

    ``batch_loss(model, rng, gen, world) -> (loss, {name: value})`` draws the global batch from the
    numpy ``rng`` and the CPU torch ``gen`` (so every device and every process count sees the same
    draws) and returns the loss on ``world``'s slice. ``stop_after`` ends early (to test resumption).
    ``data``: a reader of prepared data with ``digest`` (its identity, recorded instead of the shapes
    world's) and ``state()`` / ``restore(state)`` (its reading position, kept in every checkpoint).
    Returns the loss history (every ``log_every`` steps and the last), seconds and the resume step.
    """
    missing = [k for k in LOOP_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{what} settings lack {missing}")
    device = next(model.parameters()).device
    check_trainable_dtype(next(model.parameters()).dtype, what)
    w = distributed.world(device)
    provenance = {
        "input_model_sha256": state_digest(model),
        "data_sha256": data.digest if data is not None else data_digest(),
        "spec": json.loads(json.dumps(cfg)),
        "names": list(names),
    }
    trained = distributed.sharded_twin(model, set(names), device) if w.sharded else model
    params = dict(trained.named_parameters())
    frozen_by_design = {n for n, p in model.named_parameters() if not p.requires_grad}  # e.g. sin-cos tables
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW(
        [params[n] for n in names], lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg["weight_decay"]
    )
    rng = np.random.default_rng(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    start, history = 0, []
    ckpt = Checkpoint(checkpoint_dir, provenance) if checkpoint_dir else None
    if ckpt is not None and ckpt.path.exists():
        meta, why_not = ckpt.resumable()
        if meta is None:
            log.warning("not resuming from checkpoint %s: %s; starting %s over", ckpt.path, why_not, what)
            w.barrier()
            if w.is_main:
                shutil.rmtree(ckpt.path)
        else:
            ckpt.load(meta, params, names, opt, rng, gen, data)
            start, history = int(meta["step"]), list(meta["history"])
            log.info(
                "resuming %s from step %d (checkpoint %s matches input model, data and settings)",
                what,
                start,
                ckpt.path,
            )
    trained.train()
    steps, t0 = cfg["steps"], time.time()
    bar = tqdm(range(start, steps), desc=what, disable=not progress or not w.is_main, mininterval=2.0)
    for step in bar:
        if stop_after is not None and step >= stop_after:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg["lr"], cfg["warmup_frac"], cfg["min_lr_frac"])
        loss, parts = batch_loss(trained, rng, gen, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([params[n] for n in names], cfg["grad_clip"])
        if not _step_is_finite(loss, grad_norm, w):
            raise NonFiniteError(
                f"{what}: non-finite loss ({float(loss.detach()):g}) or gradient norm at step {step} "
                f"(lr {opt.param_groups[0]['lr']:g}, dtype {str(next(trained.parameters()).dtype)[6:]}); "
                "training diverged and nothing was saved: lower the learning rate or use float32"
            )
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            record = {"step": step, **{k: _global_mean(v, w) for k, v in parts.items()}}
            history.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step"})
            log.info("step %d %s", step, " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
        if ckpt is not None and ((step + 1) % cfg.get("checkpoint_every", steps) == 0 or step + 1 == steps):
            ckpt.save(step + 1, params, names, opt, rng, gen, history, w, data)
    trained.eval()
    if w.sharded:
        distributed.copy_back(trained, model, w)
    check_finite_weights(model, names, what)
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen_by_design)
    return {
        "history": history,
        "seconds": time.time() - t0,
        "resumed_from": start,
        "processes": w.size,
        "is_main": w.is_main,
    }


def _global_mean(value: torch.Tensor, w) -> float:
    """A logged loss as the mean over the processes' slices (the global batch's loss)."""
    value = value.detach().float()
    if w.sharded:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= w.size
    return float(value)
