"""MoE tuning on the rectified-flow loss: expert-frozen (routers only) or full (experts + routers).

Only the MoE component's MLP blocks ever train; everything else (understanding tower included)
stays frozen. Checkpoints hold weights, optimizer state and RNG states in safetensors + JSON (no
pickle), written atomically every ``checkpoint_every`` steps; a killed run resumes from the last one
and ends with exactly the weights an uninterrupted run reaches.
"""
from __future__ import annotations

import inspect
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .. import tasks
from ..io import atomic_path, save_model, sha256_file, state_digest
from ..models import SUFFIX, check_component
from ..spec import merge_spec
from ..train import lr_at
from ..worlds import shapes
from .block import load_balancing_loss

log = logging.getLogger(__name__)

MODES = ("frozen", "full")
TUNE_DEFAULTS = dict(steps=400, batch_gen=32, lr=1e-3, weight_decay=0.0, warmup_frac=0.05, min_lr_frac=0.1,
                     cond_dropout=0.1, grad_clip=1.0, balance_coef=0.0, checkpoint_every=100, seed=0, threads=2)
ROUTER_PREFIXES = ("gate.", "shared_expert_gate.")


def trainable_names(model, component: str, mode: str) -> list[str]:
    """Parameters tuned in ``mode``: routers only (frozen) or the whole MoE blocks (full)."""
    check_component(component)
    if mode not in MODES:
        raise ValueError(f"unknown tuning mode {mode!r}; expected one of {MODES}")
    spec = model.config.moe.get(component)
    if not spec:
        raise ValueError(f"the {component} component has no MoE layers to tune; run `unisparse partition` first")
    prefixes = [f"language_model.model.layers.{i}.mlp{SUFFIX[component]}." for i in spec["layers"]]
    names = []
    for name, _ in model.named_parameters():
        for prefix in prefixes:
            if name.startswith(prefix):
                local = name[len(prefix):]
                if mode == "full" or local.startswith(ROUTER_PREFIXES):
                    names.append(name)
    return names


class RouterCollector:
    """Observer that keeps each MoE layer's router logits and choices of one forward (for the
    balance loss and for expert-load statistics)."""

    def __init__(self):
        self.aux = []

    def on_layer(self, layer, component, h_in, attn_update, mlp_update, mlp_aux):
        if mlp_aux and "router_logits" in mlp_aux:
            self.aux.append((layer, component, mlp_aux))


def data_digest() -> str:
    """Identity of the training data: the world that generates it (its source), so a checkpoint made
    on other data is not resumed."""
    return sha256_file(inspect.getsourcefile(shapes))


def _provenance(input_sha256: str, names, cfg) -> dict:
    """What a checkpoint must have been made from to be resumed: the input model's content, the
    data, the tuning settings and the tuned parameters."""
    return {"input_model_sha256": input_sha256, "data_sha256": data_digest(), "spec": json.loads(json.dumps(cfg)),
            "names": list(names)}


def _save_checkpoint(path: Path, step: int, model, names, opt, rng, gen, provenance: dict, history: list) -> None:
    params = dict(model.named_parameters())
    tensors = {f"param.{n}": params[n].detach().contiguous() for n in names}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone().contiguous()
    tensors["rng.torch"] = gen.get_state()
    with atomic_path(path, is_dir=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {"step": step, "numpy_rng": rng.bit_generator.state, "history": history,
                "state_sha256": sha256_file(tmp / "state.safetensors"), **provenance}
        (tmp / "meta.json").write_text(json.dumps(meta))


def _resumable(path: Path, provenance: dict) -> tuple[dict | None, str]:
    """The checkpoint's meta if it may be resumed, else None and why not."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return None, f"its meta.json is unreadable ({e})"
    for key, what in (("input_model_sha256", "another input model"), ("data_sha256", "other training data"),
                      ("spec", "other tuning settings"), ("names", "other trainable parameters")):
        if meta.get(key) != provenance[key]:
            return None, f"it was made from {what}"
    state = path / "state.safetensors"
    if not state.is_file() or sha256_file(state) != meta.get("state_sha256"):
        return None, "its state.safetensors is missing or corrupted"
    return meta, ""


def _load_checkpoint(path: Path, meta: dict, model, names, opt, rng, gen) -> None:
    tensors = load_file(str(path / "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[f"param.{n}"])
    for i, p in enumerate(opt.param_groups[0]["params"]):
        state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if state:
            opt.state[p] = state
    gen.set_state(tensors["rng.torch"])
    rng.bit_generator.state = meta["numpy_rng"]


def tune_moe(model, component: str, mode: str, spec: dict | None = None, checkpoint_dir=None,
             progress: bool = True, stop_after: int | None = None) -> dict:
    """Tune in place. ``stop_after`` ends the run early (used to test resumption).

    A checkpoint in ``checkpoint_dir`` is resumed only if it was made from this very input model
    (content hash), the same data and the same settings; otherwise tuning starts over and says so."""
    cfg = merge_spec(TUNE_DEFAULTS, spec, "tuning")
    torch.set_num_threads(int(cfg["threads"]))
    names = trainable_names(model, component, mode)
    provenance = _provenance(state_digest(model), names, cfg)
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW([params[n] for n in names], lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg["weight_decay"])
    rng = np.random.default_rng(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    start, history = 0, []
    ckpt = Path(checkpoint_dir) / "last" if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        meta, why_not = _resumable(ckpt, provenance)
        if meta is None:
            log.warning("not resuming from checkpoint %s: %s; starting %s tuning over", ckpt, why_not, mode)
            shutil.rmtree(ckpt)
        else:
            _load_checkpoint(ckpt, meta, model, names, opt, rng, gen)
            start, history = int(meta["step"]), list(meta["history"])
            log.info("resuming %s tuning from step %d (checkpoint %s matches input model, data and settings)",
                     mode, start, ckpt)
    model.train()
    router_spec = model.config.moe[component]
    t0 = time.time()
    bar = tqdm(range(start, cfg["steps"]), desc=f"tune-moe {mode}", disable=not progress, mininterval=2.0)
    for step in bar:
        if stop_after is not None and step >= stop_after:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup_frac"], cfg["min_lr_frac"])
        prompts = [shapes.sample_gen_example(rng, "train")[0] for _ in range(cfg["batch_gen"])]
        ids, images = tasks.gen_batch(prompts)
        keep = torch.rand(len(prompts), generator=gen) >= cfg["cond_dropout"]
        collector = RouterCollector()
        loss = model.flow_loss(ids, images, cond_keep=keep, generator=gen, observer=collector if cfg["balance_coef"] else None)
        if cfg["balance_coef"]:
            bal = sum(load_balancing_loss(a["router_logits"], a["expert_idx"], router_spec["num_experts"]) for _, _, a in collector.aux)
            loss = loss + cfg["balance_coef"] * bal / max(1, len(collector.aux))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([params[n] for n in names], cfg["grad_clip"])
        opt.step()
        if step % 50 == 0 or step == cfg["steps"] - 1:
            history.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("step %d loss %.4f", step, loss.item())
        if ckpt is not None and ((step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == cfg["steps"]):
            _save_checkpoint(ckpt, step + 1, model, names, opt, rng, gen, provenance, history)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"mode": mode, "component": component, "trainable": len(names), "seconds": time.time() - t0,
            "history": history, "tune": cfg}


def expert_load(model, component: str, items: int = 64, num_steps: int = 10, seed: int = 0) -> dict:
    """Fraction of routed tokens per expert and layer while sampling evaluation prompts, with the
    coefficient of variation (0 = perfectly balanced)."""
    pairs = shapes.geneval_set("eval", 1, None, seed)[:items]
    collector = RouterCollector()
    model.generate_images([shapes.encode(p.text) for p, _ in pairs], [s for _, s in pairs], num_steps=num_steps,
                          observer=collector)
    E = model.config.moe[component]["num_experts"]
    counts: dict[int, torch.Tensor] = {}
    for layer, comp, aux in collector.aux:
        if comp == component:
            counts[layer] = counts.get(layer, torch.zeros(E)) + torch.bincount(aux["expert_idx"].reshape(-1), minlength=E).float()
    per_layer = {str(i): (c / c.sum()).tolist() for i, c in sorted(counts.items())}
    cv = [float(c.std() / c.mean()) for c in counts.values()]
    used = [float((c > 0).float().mean()) for c in counts.values()]
    return {"per_layer": per_layer, "cv_mean": float(np.mean(cv)), "experts_used_frac": float(np.mean(used))}


def save_tuned(model, out_dir) -> None:
    save_model(model, out_dir)
