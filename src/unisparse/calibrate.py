"""Calibration statistics: one streaming pass per task, running sums only.

Per layer and component it accumulates, over every token that component computes:
  * cosine scores for depth pruning, in fp32, in two definitions:
      - ``ld`` (LLM-Drop): block ``cos(h_in, h_out)``, attention ``cos(h_in, h_mid)``,
        MLP ``cos(h_mid, h_out)`` with ``h_mid = h_in + attn``, ``h_out = h_mid + mlp``;
      - ``bagel`` (as published for BAGEL): block ``cos(h_in, mlp)``, MLP ``cos(h_mid, mlp)``
        (the stream against the raw MLP update); attention as in ``ld``;
  * per MLP neuron j: the token-weighted sum of ``|silu(gate_j x) * up_j x|``, and the published
    statistic (a per-call mean over all tokens and neurons of ``|a * mean_col(W_down)|``, which on
    packed 2-D inputs collapses to one number per layer);
  * optionally a binary co-activation matrix per layer (for clustering neurons into experts).

Memory does not grow with the number of tokens: each forward adds to fixed-size sums.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import tasks
from .io import IntegrityError, atomic_path, read_json, sha256_file, write_json
from .models import COMPONENTS
from .spec import merge_spec
from .worlds import shapes

log = logging.getLogger(__name__)

TASKS = ("und", "gen")
COSINES = ("block_ld", "block_bagel", "attn", "mlp_ld", "mlp_bagel")
CALIB_DEFAULTS = dict(qa_items=512, qa_seed=2, samples_per_prompt=2, max_prompts_per_tag=16, gen_seed=3,
                      num_steps=20, cfg_scale=3.0, batch_size=128, coactivation=False, threads=1)


def _cos_sum(a, b) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8).double().sum())


class CalibrationStats:
    """A ``LayerObserver`` that keeps running sums per (layer, component)."""

    def __init__(self, model, coactivation: bool = False):
        self.num_layers = model.config.num_hidden_layers
        self.coactivation = coactivation
        self.sums: dict[str, dict] = {c: {} for c in COMPONENTS}
        L = self.num_layers
        for c in COMPONENTS:
            s = self.sums[c]
            s["tokens"] = torch.zeros(L, dtype=torch.float64)
            for name in COSINES:
                s[f"cos_{name}"] = torch.zeros(L, dtype=torch.float64)
                s[f"n_{name}"] = torch.zeros(L, dtype=torch.float64)
            s["pub_sum"] = torch.zeros(L, dtype=torch.float64)
            s["pub_calls"] = torch.zeros(L, dtype=torch.float64)
            s["act_abs"] = {}
            s["coact"] = {}
        # the published statistic weighs activations by the mean of each down-projection column;
        # the weights are fixed during calibration, so compute it once per dense MLP
        self._down_col_mean = {
            (i, c): mlp.down_proj.weight.detach().float().mean(0)
            for i in range(L) for c in COMPONENTS
            if (mlp := model.mlp(i, c)) is not None and hasattr(mlp, "down_proj")
        }

    def _add(self, comp, name, layer, a, b):
        s = self.sums[comp]
        s[f"cos_{name}"][layer] += _cos_sum(a, b)
        s[f"n_{name}"][layer] += a.shape[0]

    @torch.no_grad()
    def on_layer(self, layer, component, h_in, attn_update, mlp_update, mlp_aux):
        s = self.sums[component]
        n = h_in.shape[0]
        s["tokens"][layer] += n
        h_in = h_in.float()
        h_mid = h_in + attn_update.float() if attn_update is not None else h_in
        if attn_update is not None:
            self._add(component, "attn", layer, h_in, h_mid)
        if mlp_update is not None:
            m = mlp_update.float()
            h_out = h_mid + m
            self._add(component, "mlp_ld", layer, h_mid, h_out)
            self._add(component, "mlp_bagel", layer, h_mid, m)
            self._add(component, "block_bagel", layer, h_in, m)
        else:
            h_out = h_mid
        if attn_update is not None or mlp_update is not None:
            self._add(component, "block_ld", layer, h_in, h_out)
        act = (mlp_aux or {}).get("act")
        if act is not None:
            act = act.float()
            a_abs = act.abs().double().sum(0).cpu()  # running sums live on the host, in fp64
            if layer in s["act_abs"]:
                s["act_abs"][layer] += a_abs
            else:
                s["act_abs"][layer] = a_abs
            col_mean = self._down_col_mean[(layer, component)]
            s["pub_sum"][layer] += float((act * col_mean).abs().mean())
            s["pub_calls"][layer] += 1
            if self.coactivation:
                b = (act > 0).double()
                co = (b.T @ b).cpu()
                s["coact"][layer] = s["coact"].get(layer, 0) + co

    # ------------------------------------------------------------------ results
    def tensors(self, task: str) -> dict[str, torch.Tensor]:
        """Means, flattened to ``{task}.{component}.{name}`` tensors for safetensors."""
        out = {}
        for c in COMPONENTS:
            s = self.sums[c]
            out[f"{task}.{c}.tokens"] = s["tokens"].clone()
            for name in COSINES:
                n = s[f"n_{name}"]
                out[f"{task}.{c}.cos_{name}"] = torch.where(n > 0, s[f"cos_{name}"] / n.clamp(min=1), torch.nan)
            out[f"{task}.{c}.published_scalar"] = torch.where(
                s["pub_calls"] > 0, s["pub_sum"] / s["pub_calls"].clamp(min=1), torch.nan)
            for layer, a in s["act_abs"].items():
                out[f"{task}.{c}.act_abs_mean.{layer}"] = a / s["tokens"][layer]
            for layer, co in s["coact"].items():
                out[f"{task}.{c}.coactivation.{layer}"] = co / s["tokens"][layer]
        return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


@torch.no_grad()
def run_calibration(model, task: str, spec: dict | None = None, progress: bool = False) -> CalibrationStats:
    """Stream the calibration split of ``task`` through the model: understanding = prefill on
    calibration questions; generation = the real sampler (every step, cond and uncond passes)."""
    if task not in TASKS:
        raise ValueError(f"unknown calibration task {task!r}; expected one of {TASKS}")
    spec = merge_spec(CALIB_DEFAULTS, spec, "calibration")
    torch.set_num_threads(int(spec["threads"]))
    model.eval()
    stats = CalibrationStats(model, coactivation=spec["coactivation"])
    bs = spec["batch_size"]
    if task == "und":
        items = shapes.qa_set("calib", spec["qa_items"], spec["qa_seed"])
        for i in tqdm(range(0, len(items), bs), desc="calibrate und", disable=not progress):
            images, questions, _ = tasks.qa_batch(items[i : i + bs])
            model.understanding_logits(images, questions, observer=stats)
    else:
        pairs = shapes.geneval_set("calib", spec["samples_per_prompt"], spec["max_prompts_per_tag"], spec["gen_seed"])
        for i in tqdm(range(0, len(pairs), bs), desc="calibrate gen", disable=not progress):
            chunk = pairs[i : i + bs]
            model.generate_images([shapes.encode(p.text) for p, _ in chunk], [s for _, s in chunk],
                                  num_steps=spec["num_steps"], cfg_scale=spec["cfg_scale"], observer=stats)
    stats.spec = spec
    return stats


def save_stats(stats: CalibrationStats, task: str, path, meta: dict | None = None, model_sha256: str | None = None) -> None:
    """safetensors with the statistics plus a JSON sidecar saying how they were made: settings, the
    content hash of the statistics file and (``model_sha256``) of the model directory they describe."""
    tensors = stats.tensors(task)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"task": task})
        digest = sha256_file(tmp)
    sidecar = {"task": task, "spec": getattr(stats, "spec", {}), "num_layers": stats.num_layers,
               "tokens": {c: tensors[f"{task}.{c}.tokens"].tolist() for c in COMPONENTS},
               "sha256": digest, "model_sha256": model_sha256, **(meta or {})}
    write_json(str(path) + ".json", sidecar)


class Calibration:
    """Read access to a saved calibration file: cosine scores and neuron statistics."""

    def __init__(self, tensors: dict, task: str, model_sha256: str | None = None, source: str = "in memory"):
        self.t = tensors
        self.task = task
        self.model_sha256 = model_sha256  # content hash of the model directory it was computed on
        self.source = source

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a calibration file and its sidecar; the file must match the sha256 the sidecar records."""
        sidecar = Path(str(path) + ".json")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no calibration file {path}")
        if not sidecar.is_file():
            raise FileNotFoundError(f"calibration {path} has no sidecar {sidecar.name} (how it was made)")
        meta = read_json(sidecar)
        if meta.get("sha256") and sha256_file(path) != meta["sha256"]:
            raise IntegrityError(f"calibration {path} is corrupted: its content differs from the sha256 in {sidecar.name}")
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors reports a damaged header as a generic error
            raise IntegrityError(f"calibration {path} is unreadable: {e}") from None
        return cls(tensors, meta["task"], meta.get("model_sha256"), str(path))

    def check_applies_to(self, model, model_sha256: str | None = None) -> None:
        """Refuse statistics of another model: the layer count and MLP widths must match, and where
        both content hashes are known, the model must be the one the statistics were computed on."""
        layers = model.config.num_hidden_layers
        for c in COMPONENTS:
            tokens = self.t.get(f"{self.task}.{c}.tokens")
            if tokens is not None and tokens.numel() != layers:
                raise ValueError(f"calibration {self.source} describes a model with {tokens.numel()} layers; "
                                 f"this model has {layers}")
            for i in range(layers):
                act = self.t.get(f"{self.task}.{c}.act_abs_mean.{i}")
                mlp = model.mlp(i, c)
                if act is not None and mlp is not None and hasattr(mlp, "down_proj") and act.numel() != mlp.down_proj.weight.shape[1]:
                    raise ValueError(f"calibration {self.source} has {act.numel()} {c} MLP neurons at layer {i}; "
                                     f"this model has {mlp.down_proj.weight.shape[1]}")
        if self.model_sha256 and model_sha256 and self.model_sha256 != model_sha256:
            raise ValueError(f"calibration {self.source} was computed on another model (model sha256 "
                             f"{self.model_sha256[:12]}..., this one {model_sha256[:12]}...): recalibrate on this model")

    @classmethod
    def from_stats(cls, stats: CalibrationStats, task: str) -> "Calibration":
        return cls(stats.tensors(task), task)

    def cosine(self, component: str, name: str) -> torch.Tensor:
        key = f"{self.task}.{component}.cos_{name}"
        if key not in self.t:
            raise KeyError(f"no cosine '{name}' for component {component!r} in this calibration")
        return self.t[key]

    def act_abs_mean(self, component: str, layer: int) -> torch.Tensor:
        key = f"{self.task}.{component}.act_abs_mean.{layer}"
        if key not in self.t:
            raise KeyError(
                f"calibration on task {self.task!r} saw no {component!r} MLP tokens at layer {layer}; "
                f"calibrate on a task that exercises that component")
        return self.t[key]

    def published_scalar(self, component: str) -> torch.Tensor:
        return self.t[f"{self.task}.{component}.published_scalar"]

    def coactivation(self, component: str, layer: int) -> torch.Tensor | None:
        return self.t.get(f"{self.task}.{component}.coactivation.{layer}")
