"""The one training loop, used by train-tiny and by MoE tuning: plain (nanoGPT-style), resumable,
deterministic on one device, sharded with FSDP2 under torchrun.

A caller gives the model, the names of the parameters to train, the settings and a ``batch_loss``
function that draws one global batch from the loop's generators and returns this process's loss
(fp32) on its slice of it. The loop owns everything else: AdamW with a one-cycle schedule, gradient
clipping, the loss history, checkpoints, resumption and sharding.

Checkpoints hold the trained parameters, the optimizer state and the generators' states in
safetensors + JSON (no pickle), each process writing its own shard (``Checkpoint``), atomically
every ``checkpoint_every`` steps with the hash of
the run's input model, of its data source and of its settings. A checkpoint is resumed only when all
of them match (otherwise training starts over and the log says why); a resumed run ends with the
weights and the loss history an uninterrupted run reaches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from . import distributed, sharding
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


def _step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, w) -> bool:
    """Whether this step's loss and gradient norm are finite on every process (one flag all-reduced
    under torchrun, so all ranks stop together instead of one waiting in a collective)."""
    grad_norm = distributed.full_tensor(grad_norm)  # a DTensor whenever the model is sharded
    bad = (~torch.isfinite(loss.detach().float())).float() + (~torch.isfinite(grad_norm.detach().float())).float()
    if w.sharded:
        bad = bad.reshape(1).clone()
        torch.distributed.all_reduce(bad)
    return not bool(bad.sum() > 0)


class Checkpoint:
    """``<dir>/last``: the state of a run at a step, and what the run was made from.

    Each process writes its own rows of the trained parameters and of their optimizer state
    (``rank-0000r-of-0000n.safetensors``, with each tensor's global rows in the file's metadata),
    so no process gathers anything; the main process adds ``meta.json`` (step, generators, data
    position, history, provenance and every file's sha256). Loading reads, for each tensor, the rows
    this process holds now from whichever files hold them: a checkpoint resumes on any number of
    processes. Safetensors and JSON only (``torch.distributed.checkpoint``'s own format pickles its
    metadata, which this project never unpickles)."""

    def __init__(self, directory, provenance: dict):
        self.path = Path(directory) / "last"
        self.staging = Path(directory) / "last.staging"
        self.source = self.path  # where ``resumable`` found the checkpoint to resume
        self.provenance = provenance

    @staticmethod
    def _tensors(params: dict, names, opt) -> dict[str, torch.Tensor]:
        """The trained state by name: ``param.<n>`` and ``opt.<n>.<state>`` (possibly sharded)."""
        tensors = {f"param.{n}": params[n].detach() for n in names}
        for n in names:
            for k, v in opt.state.get(params[n], {}).items():
                tensors[f"opt.{n}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach()
        return tensors

    def save(self, step: int, params: dict, names, opt, rng, gen, history: list, world, data=None) -> None:
        from .sharding import local_part, local_rows

        tensors = self._tensors(params, names, opt)
        local = {k: local_part(v).cpu().contiguous() for k, v in tensors.items()}
        rows = {k: [*local_rows(v), v.shape[0] if v.dim() else 0] for k, v in tensors.items()}
        if world.is_main:
            local["rng.torch"] = gen.get_state()
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
        world.barrier()
        name = f"rank-{world.rank:05d}-of-{world.size:05d}.safetensors"
        save_file(local, str(self.staging / name), metadata={"rows": json.dumps(rows)})
        world.barrier()
        if world.is_main:
            with atomic_path(self.path, is_dir=True) as tmp:
                files = {}
                for f in sorted(self.staging.iterdir()):
                    files[f.name] = sha256_file(f)
                    os.replace(f, tmp / f.name)
                meta = {
                    "step": step,
                    "numpy_rng": rng.bit_generator.state,
                    "history": history,
                    "processes": world.size,
                    "files": files,
                    **({"data_position": data.state()} if data is not None else {}),
                    **self.provenance,
                }
                (tmp / "meta.json").write_text(json.dumps(meta))
            shutil.rmtree(self.staging, ignore_errors=True)
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
        if not meta.get("files"):
            return None, "it was written in an older format (one gathered state file)"
        for name, digest in meta["files"].items():
            path = self.source / name
            if not path.is_file() or sha256_file(path) != digest:
                return None, f"its {name} is missing or corrupted"
        return meta, ""

    def load(self, meta: dict, params: dict, names, opt, rng, gen, data=None) -> None:
        from safetensors import safe_open

        from .sharding import local_part, local_rows

        handles = [safe_open(str(self.source / f), framework="pt") for f in sorted(meta["files"])]
        pieces = [(h, json.loads(h.metadata()["rows"])) for h in handles]

        def read(key: str, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
            if like.dim() == 0:
                return handles[0].get_tensor(key)  # a scalar (the optimizer's step): the same on every rank
            parts = []
            for handle, rows in pieces:
                a, b, _ = rows[key]
                lo, hi = max(a, start), min(b, stop)
                if lo < hi:
                    parts.append(handle.get_slice(key)[lo - a : hi - a])
            got = torch.cat(parts) if parts else torch.empty((0, *like.shape[1:]), dtype=like.dtype)
            if got.shape[0] != stop - start:
                raise ValueError(f"checkpoint {self.source}: rows {start}:{stop} of {key} are not all stored")
            return got

        with torch.no_grad():
            for n in names:
                p = params[n]
                local_part(p).copy_(read(f"param.{n}", *local_rows(p), p))
        # the optimizer's state, built as AdamW would (same layout as its parameter), then filled
        stored = {k for h in handles for k in h.keys()}
        for n in names:
            p = params[n]
            state = {}
            for key in sorted(k for k in stored if k.startswith(f"opt.{n}.")):
                k = key[len(f"opt.{n}.") :]
                if k == "step":
                    state[k] = read(key, 0, 0, torch.zeros(()))
                else:
                    value = torch.zeros_like(p, memory_format=torch.preserve_format)
                    local_part(value).copy_(read(key, *local_rows(p), p))
                    state[k] = value
            if state:
                opt.state[p] = state
        gen.set_state(handles[0].get_tensor("rng.torch"))
        rng.bit_generator.state = meta["numpy_rng"]
        if data is not None:
            data.restore(meta["data_position"])


def master_dtype_of(cfg: dict, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype trainable parameters are kept and updated in: ``master_dtype`` of the settings
    (``float32``, the default; ``model``: the model's own dtype, pure bf16 AdamW, which rounds away
    updates smaller than half a bf16 ulp of the weight)."""
    from .choices import MASTER_DTYPES

    value = cfg.get("master_dtype", "float32")
    if value not in MASTER_DTYPES:
        raise ValueError(f"master_dtype {value!r}: expected one of {MASTER_DTYPES}")
    return model_dtype if value == "model" else torch.float32


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
    family=None,
    input_digest: str | None = None,
) -> dict:
    """Train ``names`` of ``model`` in place for ``cfg["steps"]`` steps.

    ``batch_loss(model, rng, gen, world) -> (loss, {name: value})`` draws the global batch from the
    numpy ``rng`` and the CPU torch ``gen`` (so every device and every process count sees the same
    draws) and returns the loss on ``world``'s slice. ``stop_after`` ends early (to test resumption).
    ``data``: a reader of prepared data with ``digest`` (its identity, recorded instead of the shapes
    world's) and ``state()`` / ``restore(state)`` (its reading position, kept in every checkpoint).
    ``family``: the model's family adapter (which units shard; default ``families.family_for``);
    ``input_digest``: the input's identity (default: the hash of the model's tensors, which a model
    already sharded from its files cannot give: the CLI passes its directory's hash).
    A model that is sharded already (``sharding.shard``) is trained as it is and stays sharded
    (the caller writes it, ``sharding.save_sharded``); otherwise, under torchrun or with fp32 master
    weights for a lower-precision model, a sharded twin trains and its weights are copied back.
    Returns the loss history (every ``log_every`` steps and the last), seconds and the resume step.
    """
    missing = [k for k in LOOP_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{what} settings lack {missing}")
    device = next(model.parameters()).device
    frozen_dtype = next(
        (p.dtype for n, p in model.named_parameters() if n not in names and p.is_floating_point()),
        next(model.parameters()).dtype,
    )
    check_trainable_dtype(frozen_dtype, what)
    master = master_dtype_of(cfg, frozen_dtype)
    w = distributed.world(device)
    provenance = {
        "input_model_sha256": input_digest or state_digest(model),
        "data_sha256": data.digest if data is not None else data_digest(),
        "spec": json.loads(json.dumps(cfg)),
        "names": list(names),
    }
    frozen_by_design = {n for n, p in model.named_parameters() if not p.requires_grad and n not in names}
    if distributed.is_sharded(model):
        trained = model
    elif w.sharded or master != frozen_dtype or cfg.get("activation_checkpointing"):
        if not w.sharded:
            distributed.single_process_group(device)
        from .families import family_for

        trained = sharding.sharded_twin(
            family or family_for(model), set(names), device, master, bool(cfg.get("activation_checkpointing"))
        )
    else:
        trained = model
    params = dict(trained.named_parameters())
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
    bad = sharding.all_finite(params, names)
    if bad:
        raise NonFiniteError(
            f"{what}: {len(bad)} trained tensor(s) hold non-finite values ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}); nothing was saved"
        )
    if trained is not model:
        distributed.copy_back(trained, model, w)
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
