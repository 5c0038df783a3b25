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
  * optionally a co-activation sketch per layer (for clustering neurons into experts): with B the
    binary activations ``[tokens, I]`` (``act > 0``) and C = B^T B the co-activation matrix, it
    keeps S = C Omega = B^T (B Omega), Omega a fixed ``[I, d]`` Rademacher projection scaled by
    1/sqrt(d) (``coactivation_dim`` d, ``coactivation_seed``; see ``sketch_projection``). Row j of S
    is a Johnson-Lindenstrauss projection of row j of C, so inner products and cosines between
    neurons' co-activation profiles (all that balanced spherical k-means uses) survive up to a
    relative error of order 1/sqrt(d). At BAGEL's width (I = 18944) that is I*d*4 bytes = 19 MB per
    layer and tower at d = 256 instead of the full matrix's I*I*8 = 2.9 GB.

Memory does not grow with the number of tokens: each forward adds to fixed-size sums (per layer and
component: a few scalars, two [I] vectors and the [I, d] sketch; plus one Omega per MLP width and
device). The per-forward transients are of the size of that forward's activations.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import tasks
from .benchmarks import DEFAULT_BENCHMARKS, check_benchmarks
from .choices import TASKS
from .families import family_for, require_family
from .io import IntegrityError, NonFiniteError, atomic_path, read_json, sha256_file, write_json
from .models.sampling import SAMPLER_DEFAULTS, sampler_settings
from .spec import merge_spec
from .worlds import shapes

log = logging.getLogger(__name__)

COSINES = ("block_ld", "block_bagel", "attn", "mlp_ld", "mlp_bagel")
#: tensor names of the co-activation statistic: the [I, d] sketch; files written before the sketch
#: hold the full [I, I] matrix under the old name (still read: its rows are features as well)
SKETCH_KEY, LEGACY_COACT_KEY = "coactivation_sketch", "coactivation"
#: how far past +-1 an fp32 mean of cosines may lie by rounding alone
COSINE_SLACK = 1e-4
CALIB_DEFAULTS = dict(
    benchmarks=DEFAULT_BENCHMARKS,
    qa_items=512,
    qa_seed=2,
    samples_per_prompt=2,
    max_prompts_per_tag=16,
    gen_seed=3,
    **SAMPLER_DEFAULTS,
    batch_size=128,
    coactivation=False,
    coactivation_dim=256,
    coactivation_seed=0,
    threads=1,
    # the real benchmarks' calibration sources (read only when `benchmarks` names them;
    # evaluate.calibration_inputs): POPE items off MME's images, GenEval-style prompts
    calib_dataset="lmms-lab/POPE",
    calib_revision=None,
    calib_split="test",
    calib_items=84,
    calib_exclude_mme_images=True,
    mme_dataset="lmms-lab/MME",
    mme_revision=None,
    mme_split="test",
    hf_cache_dir=None,
)
#: how the co-activation sketch's projection is made (recorded in the sidecar)
SKETCH_KIND = "rademacher-hash32"
_M32 = 0xFFFFFFFF


def _hash32(x):
    """A bijective 32-bit integer mix (two multiply-xorshift rounds) of an int64 tensor or int whose
    values lie in [0, 2^32); every product stays below 2^59, so int64 never overflows."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def sketch_projection(width: int, dim: int, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """The co-activation sketch's projection Omega ``[width, dim]``: entries +-1/sqrt(dim), each sign a
    hash of (seed, row, column). Made with integer ops directly on ``device`` (no host tensor, no
    random generator), so it is a pure function of (width, dim, seed): every device and dtype gets the
    same matrix, and a sketch computed on a GPU matches the CPU one up to float rounding."""
    if width * dim > _M32:
        raise ValueError(f"co-activation sketch of {width} x {dim} entries is too large (at most 2^32)")
    idx = torch.arange(width * dim, device=device, dtype=torch.int64)
    signs = (_hash32(idx ^ _hash32(int(seed) & _M32)) >> 15) & 1
    return (signs.to(dtype) * 2 - 1).mul_(dim**-0.5).view(width, dim)


def _cos_sum(a, b) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8).double().sum())


def _mlp_key(name: str, slot: str | None) -> str:
    """Tensor name of an MLP statistic: a layer's only MLP (slot ``mlp``, the MoT) keeps the plain
    name; a layer with several MLPs (an MMDiT block's ``img_mlp`` / ``txt_mlp``) adds the slot."""
    return name if slot in (None, "mlp") else f"{name}.{slot}"


class CalibrationStats:
    """A ``LayerObserver`` that keeps running sums per (layer, component) and, for MLP statistics,
    per MLP slot of the layer."""

    def __init__(
        self,
        family,
        coactivation: bool = False,
        coactivation_dim: int = CALIB_DEFAULTS["coactivation_dim"],
        coactivation_seed: int = CALIB_DEFAULTS["coactivation_seed"],
    ):
        require_family(family, "CalibrationStats")
        self.components = family.components
        self.layers = {c: family.num_layers(c) for c in self.components}
        self.coactivation = coactivation
        if coactivation_dim < 1:
            raise ValueError(f"coactivation_dim must be >= 1, got {coactivation_dim}")
        self.coactivation_dim = int(coactivation_dim)
        self.coactivation_seed = int(coactivation_seed)
        self._projections: dict[tuple, torch.Tensor] = {}  # one Omega per (width, device, dtype), shared by layers
        self.sums: dict[str, dict] = {c: {} for c in self.components}
        for c in self.components:
            L = self.layers[c]
            s = self.sums[c]
            s["tokens"] = torch.zeros(L, dtype=torch.float64)
            for name in COSINES:
                s[f"cos_{name}"] = torch.zeros(L, dtype=torch.float64)
                s[f"n_{name}"] = torch.zeros(L, dtype=torch.float64)
            s["pub_sum"] = {slot: torch.zeros(L, dtype=torch.float64) for slot in family.mlp_slots(c)}
            s["pub_calls"] = {slot: torch.zeros(L, dtype=torch.float64) for slot in family.mlp_slots(c)}
            s["act_abs"] = {}  # (layer, slot) -> [I] running sum
            s["act_tokens"] = {}  # (layer, slot) -> tokens that MLP computed
            s["coact"] = {}
        # the published statistic weighs activations by the mean of each down-projection column;
        # the weights are fixed during calibration, so compute it once per dense MLP
        self._down_col_mean = {
            (i, c, slot): w.down.float().mean(0)
            for c in self.components
            for i, slot in family.mlp_places(c)
            if (w := family.mlp_weights(c, i, slot)) is not None
        }
        self._first_slot = {c: family.mlp_slots(c)[0] for c in self.components}

    @property
    def num_layers(self):
        """Layers per component (one number when the components have equally many, as in the MoT)."""
        counts = set(self.layers.values())
        return counts.pop() if len(counts) == 1 else dict(self.layers)

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
            slot = mlp_aux.get("slot", self._first_slot[component])
            key = (layer, slot)
            act = act.float()
            a_abs = act.abs().double().sum(0).cpu()  # running sums live on the host, in fp64
            if key in s["act_abs"]:
                s["act_abs"][key] += a_abs
                s["act_tokens"][key] += act.shape[0]
            else:
                s["act_abs"][key] = a_abs
                s["act_tokens"][key] = act.shape[0]
            col_mean = self._down_col_mean[(layer, component, slot)]
            s["pub_sum"][slot][layer] += float((act * col_mean).abs().mean())
            s["pub_calls"][slot][layer] += 1
            if self.coactivation:
                self._sketch(s["coact"], key, act)

    def projection(self, width: int, device, dtype=torch.float32) -> torch.Tensor:
        """Omega for MLP width ``width`` on ``device``: made once, shared by every layer and component."""
        key = (width, str(torch.device(device)), dtype)
        if key not in self._projections:
            self._projections[key] = sketch_projection(
                width, self.coactivation_dim, self.coactivation_seed, device, dtype
            )
        return self._projections[key]

    def _sketch(self, sketches: dict, key, act) -> None:
        """S += B^T (B Omega) for this forward's binary activations B, on the activations' device.

        fp32 on every device, by choice: rounding (~1e-7 relative per addition) is far below the
        sketch's own distortion of order 1/sqrt(d) (6% at d = 256), while fp64 would double the
        memory and is slow or missing on accelerators (1/64 rate on consumer GPUs, absent on MPS).
        B Omega is exact (0/1 times +-2^-4 at d = 256, partial sums below 2^24)."""
        b = (act > 0).to(torch.float32)  # [n, I]
        omega = self.projection(b.shape[1], b.device)
        if key not in sketches:
            sketches[key] = torch.zeros(b.shape[1], self.coactivation_dim, dtype=torch.float32, device=b.device)
        sketches[key].addmm_(b.T, b @ omega)  # in place: no [I, d] temporary

    # ------------------------------------------------------------------ results
    def tensors(self, task: str) -> dict[str, torch.Tensor]:
        """Means, flattened to ``{task}.{component}.{name}`` tensors for safetensors."""
        out = {}
        for c in self.components:
            s = self.sums[c]
            out[f"{task}.{c}.tokens"] = s["tokens"].clone()
            for name in COSINES:
                n = s[f"n_{name}"]
                out[f"{task}.{c}.cos_{name}"] = torch.where(n > 0, s[f"cos_{name}"] / n.clamp(min=1), torch.nan)
            for slot, calls in s["pub_calls"].items():
                out[f"{task}.{c}.{_mlp_key('published_scalar', slot)}"] = torch.where(
                    calls > 0, s["pub_sum"][slot] / calls.clamp(min=1), torch.nan
                )
            for (layer, slot), a in s["act_abs"].items():
                out[f"{task}.{c}.{_mlp_key(f'act_abs_mean.{layer}', slot)}"] = a / s["act_tokens"][(layer, slot)]
            for (layer, slot), sketch in s["coact"].items():
                out[f"{task}.{c}.{_mlp_key(f'{SKETCH_KEY}.{layer}', slot)}"] = sketch.cpu() / float(
                    s["act_tokens"][(layer, slot)]
                )
        return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def shapes_inputs(task: str, spec: dict, encode=shapes.encode):
    """The shapes world's calibration split as model inputs: ``(batches, data)`` where a batch is
    ``(images, question_ids)`` (understanding) or ``(prompt_ids, seeds)`` (generation) and ``data`` says
    where they come from; ``encode``: the model's tokenizer. Real benchmarks bring their own
    (``evaluate.calibration_inputs``)."""
    bs, split = spec["batch_size"], "calib"
    if task == "und":
        items = shapes.qa_set(split, spec["qa_items"], spec["qa_seed"])
        batches = (tasks.qa_batch(items[i : i + bs], encode)[:2] for i in range(0, len(items), bs))
        return batches, {"split": split, "qa_seed": spec["qa_seed"]}
    pairs = shapes.geneval_set(split, spec["samples_per_prompt"], spec["max_prompts_per_tag"], spec["gen_seed"])
    batches = (
        ([encode(p.text) for p, _ in pairs[i : i + bs]], [s for _, s in pairs[i : i + bs]])
        for i in range(0, len(pairs), bs)
    )
    return batches, {"split": split, "gen_seed": spec["gen_seed"], "max_prompts_per_tag": spec["max_prompts_per_tag"]}


@torch.no_grad()
def run_calibration(
    family, task: str, spec: dict | None = None, progress: bool = False, inputs=None
) -> CalibrationStats:
    """Stream a calibration split of ``task`` through the model: understanding = prefill on calibration
    questions; generation = the real sampler (every step, cond and uncond passes, the settings'
    ``SAMPLER_DEFAULTS`` keys). ``inputs``: ``(batches, data)`` as ``shapes_inputs`` gives them (the
    default: the shapes world's calibration split). ``family``: the model's adapter (``families``)."""
    if task not in TASKS:
        raise ValueError(f"unknown calibration task {task!r}; expected one of {TASKS}")
    family = family_for(family)
    spec = merge_spec(CALIB_DEFAULTS, spec, "calibration")
    spec["benchmarks"] = check_benchmarks(spec["benchmarks"])
    torch.set_num_threads(int(spec["threads"]))
    family.eval()
    stats = CalibrationStats(
        family,
        coactivation=spec["coactivation"],
        coactivation_dim=spec["coactivation_dim"],
        coactivation_seed=spec["coactivation_seed"],
    )
    batches, source = inputs if inputs is not None else shapes_inputs(task, spec, family.encode)
    # what was actually streamed, counted as it is streamed (the sidecar's provenance)
    data = {"split": source.get("split", "calib"), "batches": 0, **source}
    sampler = None
    if task == "und":
        data.update(qa_items=0, images=0)
        for images, questions in tqdm(batches, desc="calibrate und", disable=not progress):
            family.understanding_logits(images, questions, observer=stats)
            data["batches"] += 1
            data["qa_items"] += len(questions)
            data["images"] += len(images)
    else:
        shift = family.default_shift  # generate_images' default: the model's own shift (recorded)
        settings = sampler_settings(spec)  # the evaluation's sampler: calibration sees what inference computes
        if shift is not None:
            settings = {**settings, "shift": shift}
        sampler = {**settings, "shift": shift, "samples_per_prompt": spec["samples_per_prompt"], "seeds": []}
        data.update(prompts=0, images=0)
        prompts = set()
        for prompt_ids, seeds in tqdm(batches, desc="calibrate gen", disable=not progress):
            family.generate_images(prompt_ids, seeds, observer=stats, **settings)
            data["batches"] += 1
            data["images"] += len(seeds)
            prompts.update(tuple(p) for p in prompt_ids)
            sampler["seeds"] += [int(s) for s in seeds]
        data["prompts"] = len(prompts)
    stats.spec = spec
    stats.provenance = {
        "data": data,
        "sampler": sampler and {**sampler, "cfg_interval": list(sampler["cfg_interval"])},
        "coactivation": {
            "key": SKETCH_KEY,
            "kind": SKETCH_KIND,
            "dim": stats.coactivation_dim,
            "seed": stats.coactivation_seed,
        }
        if stats.coactivation
        else None,
    }
    return stats


def save_stats(
    stats: CalibrationStats, task: str, path, meta: dict | None = None, model_sha256: str | None = None
) -> None:
    """safetensors with the statistics plus a JSON sidecar saying how they were made: settings
    (``spec``), the content hash of the statistics file and (``model_sha256``) of the model they
    describe (the CLI passes ``io.directory_digest``: the hash of the model directory's verified
    ``SHA256SUMS``, which lists the sha256 of every weight file and of config.json), tokens per layer
    and, from ``run_calibration``, what was streamed (``data``: split and item counts), the sampler
    (``sampler``: steps, CFG scale, interval and renormalisation, shift, samples per prompt, every
    sample seed; None for understanding) and the co-activation sketch (``coactivation``: key, kind,
    dim, seed; None if off). Statistics ``Calibration.load`` would refuse (an overflowing model's
    inf) are refused here, before anything is written."""
    tensors = stats.tensors(task)
    try:
        Calibration(tensors, task, source=f"computed for {path}").check_values()
    except IntegrityError as e:
        raise NonFiniteError(f"{e}; the model overflowed in its dtype (try float32); nothing was written") from None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"task": task})
        digest = sha256_file(tmp)
    sidecar = {
        "task": task,
        "spec": getattr(stats, "spec", {}),
        "num_layers": stats.num_layers,
        "tokens": {c: tensors[f"{task}.{c}.tokens"].tolist() for c in stats.components},
        **getattr(stats, "provenance", {}),
        "sha256": digest,
        "model_sha256": model_sha256,
        **(meta or {}),
    }
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
            raise IntegrityError(
                f"calibration {path} is corrupted: its content differs from the sha256 in {sidecar.name}"
            )
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors reports a damaged header as a generic error
            raise IntegrityError(f"calibration {path} is unreadable: {e}") from None
        calibration = cls(tensors, meta["task"], meta.get("model_sha256"), str(path))
        calibration.check_values()
        return calibration

    def check_values(self) -> None:
        """Refuse statistics no calibration can produce (an edited or damaged file whose hash was
        updated with it): an infinite value anywhere, a cosine outside [-1, 1], a negative or
        non-finite mean of absolute activations, a NaN cosine on a layer that saw tokens where the
        sublayer ran (see ``_unused_sublayer_nans``; NaN is what ``tensors`` writes for no tokens)."""
        bad = []
        for key, t in sorted(self.t.items()):
            t, name = t.float(), key.split(".")[2]  # {task}.{component}.{name}[.layer[.slot]]
            if bool(torch.isinf(t).any()):
                bad.append(f"{key} holds an infinite value")
            elif name.startswith("cos_") and bool((t.nan_to_num(0.0).abs() > 1 + COSINE_SLACK).any()):
                bad.append(f"{key} holds a cosine outside [-1, 1] ({float(t.nan_to_num(0.0).abs().max()):g})")
            elif name == "act_abs_mean" and not bool(torch.isfinite(t).all()):
                bad.append(f"{key} holds a non-finite mean")
            elif name in ("act_abs_mean", "published_scalar", "tokens") and bool((t < 0).any()):
                bad.append(
                    f"{key} holds a negative value ({float(t.nan_to_num(0.0).min()):g}), "
                    "impossible for a mean of absolute values or a count"
                )
        if bad:
            raise IntegrityError(
                f"calibration {self.source} holds impossible statistics: "
                + "; ".join(bad[:6])
                + (f"; ... ({len(bad) - 6} more)" if len(bad) > 6 else "")
            )

    def _check_nans(self, family) -> None:
        """A NaN cosine is written only for a layer that saw no tokens or a sublayer the model skips;
        anywhere else it is damage, and ranking on it would pick an arbitrary layer."""
        needs = {
            "attn": ("attn",),
            "mlp_ld": ("mlp",),
            "mlp_bagel": ("mlp",),
            "block_bagel": ("mlp",),
            "block_ld": ("attn", "mlp"),
        }  # the sublayer(s) whose absence leaves the cosine undefined
        bad = []
        for c in family.components:
            tokens = self.t.get(f"{self.task}.{c}.tokens")
            if tokens is None:
                continue
            skipped = family.skipped(c)
            for name, sublayers in needs.items():
                cos = self.t.get(f"{self.task}.{c}.cos_{name}")
                if cos is None:
                    continue
                for layer in torch.nonzero(cos.isnan() & (tokens > 0)).flatten().tolist():
                    if not all(layer in skipped.get(sub, []) for sub in sublayers):
                        bad.append(f"{c} cos_{name} at layer {layer}")
        if bad:
            raise IntegrityError(
                f"calibration {self.source} holds NaN cosines on layers that saw tokens: "
                + ", ".join(bad[:6])
                + (f", ... ({len(bad) - 6} more)" if len(bad) > 6 else "")
            )

    def check_applies_to(self, family, model_sha256: str | None = None) -> None:
        """Refuse statistics of another model: the layer counts and MLP widths must match, and where
        both content hashes are known, the model must be the one the statistics were computed on."""
        family = family_for(family)
        self._check_nans(family)
        for c in family.components:
            layers = family.num_layers(c)
            tokens = self.t.get(f"{self.task}.{c}.tokens")
            if tokens is not None and tokens.numel() != layers:
                raise ValueError(
                    f"calibration {self.source} describes a model with {tokens.numel()} {c} layers; "
                    f"this model has {layers}"
                )
            for i, slot in family.mlp_places(c):
                act = self.t.get(f"{self.task}.{c}.{_mlp_key(f'act_abs_mean.{i}', slot)}")
                weights = family.mlp_weights(c, i, slot)
                if act is not None and weights is not None and act.numel() != weights.width:
                    raise ValueError(
                        f"calibration {self.source} has {act.numel()} {c} MLP neurons at layer {i}; "
                        f"this model has {weights.width}"
                    )
        if self.model_sha256 and model_sha256 and self.model_sha256 != model_sha256:
            raise ValueError(
                f"calibration {self.source} was computed on another model (model sha256 "
                f"{self.model_sha256[:12]}..., this one {model_sha256[:12]}...): recalibrate on this model"
            )

    @classmethod
    def from_stats(cls, stats: CalibrationStats, task: str) -> "Calibration":
        return cls(stats.tensors(task), task)

    def cosine(self, component: str, name: str) -> torch.Tensor:
        key = f"{self.task}.{component}.cos_{name}"
        if key not in self.t:
            raise KeyError(f"no cosine '{name}' for component {component!r} in this calibration")
        return self.t[key]

    def act_abs_mean(self, component: str, layer: int, slot: str | None = None) -> torch.Tensor:
        key = f"{self.task}.{component}.{_mlp_key(f'act_abs_mean.{layer}', slot)}"
        if key not in self.t:
            raise KeyError(
                f"calibration on task {self.task!r} saw no {component!r} MLP tokens at layer {layer}; "
                f"calibrate on a task that exercises that component"
            )
        return self.t[key]

    def published_scalar(self, component: str, slot: str | None = None) -> torch.Tensor:
        return self.t[f"{self.task}.{component}.{_mlp_key('published_scalar', slot)}"]

    def coactivation(self, component: str, layer: int, slot: str | None = None) -> torch.Tensor | None:
        """Per-neuron co-activation features for clustering, row j for neuron j: the [I, d] sketch
        C Omega / tokens; a file written before the sketch existed holds the full [I, I] matrix
        C / tokens, returned as is (its rows are features too, so clustering still works).
        None when calibration ran without ``coactivation``."""
        sketch = self.t.get(f"{self.task}.{component}.{_mlp_key(f'{SKETCH_KEY}.{layer}', slot)}")
        if sketch is not None:
            return sketch
        return self.t.get(f"{self.task}.{component}.{_mlp_key(f'{LEGACY_COACT_KEY}.{layer}', slot)}")
