"""The memory a tuning job needs per GPU, from sizes alone: checked when the DAG is built (a tuning
job that cannot fit the GPUs its resources ask for is refused before any job is queued) and printed
by ``unisparse memory-plan`` for any config or model directory.

Pure Python (no torch): Snakemake imports it for every DAG. The terms, per GPU of ``gpus``:

* **weights**: frozen parameters in the model dtype and trainable ones as master weights, each
  sharded over the GPUs (FSDP2), plus the units gathered whole at a time: the current one and the
  prefetched next in the compute dtype, and one unit's unsharded fp32 gradient before it is
  reduce-scattered;
* **gradients** and **optimizer** state (AdamW: two moments) of the trainable parameters, sharded,
  in the master dtype;
* **activations** of the generation tokens (the frozen understanding path keeps nothing for
  backward: no trainable parameter is upstream of it), per token and layer ``6h + 2kv + 4I`` values
  in the compute dtype (norm outputs, q / k / v / attention output, the MLP's gate, up, activation
  and product; an MoE's ``I`` scaled by top-k / experts); with activation checkpointing, one
  ``h``-wide input per layer plus one layer's full set being recomputed;
* **overhead**: the runtime's own (CUDA context, NCCL buffers, allocator slack; the interpreter and
  torch on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

GB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
#: per-process runtime overhead, bytes: CUDA context + NCCL + caching-allocator slack on a GPU;
#: the interpreter, torch and gloo on the CPU (measured by benchmarks/sharded_tuning.py)
OVERHEAD = {"cuda": 4 * GB, "cpu": int(0.40 * GB)}
#: share of a GPU's memory a job may plan to use (the rest: fragmentation and kernels' workspaces)
USABLE_FRACTION = 0.9
#: prompt tokens per example on top of the image's latent tokens (long GenEval-style prompts)
PROMPT_TOKENS = 128


@dataclass(frozen=True)
class TuningSizes:
    """What the plan needs of a model and a tuning: parameter counts, the layer geometry of the
    tuned stream and the examples' length."""

    total: int  # every parameter
    trainable: int  # the parameters the tuning updates
    largest_unit: int  # parameters of the largest sharded unit (a decoder layer)
    largest_unit_trainable: int  # of which trainable
    layers: int  # layers the generation tokens pass through
    hidden: int
    kv_width: int
    mlp_width: int  # the tuned MLPs' width (an MoE's active share already applied)
    tokens: int  # generation tokens per example (latent tokens + prompt)


def plan(
    sizes: TuningSizes,
    *,
    gpus: int,
    batch: int,
    dtype: str = "bfloat16",
    master_dtype: str = "float32",
    activation_checkpointing: bool = False,
    device: str = "cuda",
) -> dict:
    """Bytes per GPU by term, and their total, for ``batch`` examples split over ``gpus``."""
    if gpus < 1:
        raise ValueError(f"a plan needs at least one GPU (or process), not {gpus}")
    model_b = DTYPE_BYTES[dtype]
    master_b = model_b if master_dtype == "model" else DTYPE_BYTES[master_dtype]
    frozen = sizes.total - sizes.trainable
    per_gpu = math.ceil(batch / gpus)
    sharded = (frozen * model_b + sizes.trainable * master_b) / gpus
    gathered = (
        2 * sizes.largest_unit * model_b + sizes.largest_unit_trainable * 4 if gpus > 1 or master_b != model_b else 0
    )
    per_token_layer = (6 * sizes.hidden + 2 * sizes.kv_width + 4 * sizes.mlp_width) * model_b
    tokens = per_gpu * sizes.tokens
    if activation_checkpointing:
        activations = tokens * (sizes.layers * sizes.hidden * model_b + per_token_layer)
    else:
        activations = tokens * sizes.layers * per_token_layer
    terms = {
        "weights": sharded + gathered,
        "gradients": sizes.trainable * master_b / gpus,
        "optimizer": 2 * sizes.trainable * master_b / gpus,
        "activations": activations,
        "overhead": OVERHEAD["cuda" if device.startswith("cuda") else "cpu"],
    }
    return {**{k: int(v) for k, v in terms.items()}, "total": int(sum(terms.values())), "batch_per_gpu": per_gpu}


def fits(result: dict, gpu_mem_gb: float) -> bool:
    return result["total"] <= USABLE_FRACTION * gpu_mem_gb * GB


def smallest_fit(sizes: TuningSizes, gpu_mem_gb: float, batch: int, limit: int = 1024, **settings) -> int | None:
    """The fewest GPUs (dividing ``batch``) whose plan fits ``gpu_mem_gb``, or None up to ``limit``."""
    for gpus in range(1, limit + 1):
        if batch % gpus == 0 and fits(plan(sizes, gpus=gpus, batch=batch, **settings), gpu_mem_gb):
            return gpus
    return None


def describe(result: dict, gpus: int, gpu_mem_gb: float | None = None) -> str:
    """One line: each term in GB, the total, and the GPU it is checked against."""
    terms = ", ".join(
        f"{k} {result[k] / GB:.1f}" for k in ("weights", "gradients", "optimizer", "activations", "overhead")
    )
    budget = f" of {USABLE_FRACTION * gpu_mem_gb:.1f} usable on {gpu_mem_gb:g} GB GPUs" if gpu_mem_gb else ""
    return f"{result['total'] / GB:.1f} GB per GPU on {gpus} ({terms}; batch {result['batch_per_gpu']} per GPU){budget}"


# ------------------------------------------------------------------------------ from a model
def sizes_from_family(family, component: str, mode: str, tokens: int | None = None) -> TuningSizes:
    """Exact tuning sizes of a model in its family (parameters on meta suffice: ``load_empty``):
    the counts, the largest unit (``shard_units``) and the tuned component's geometry. ``tokens``
    per example: default the family's training size in latent tokens plus ``PROMPT_TOKENS``."""
    from .moe.tune import trainable_names

    names = set(trainable_names(family, component, mode))
    params = dict(family.model.named_parameters())
    total = sum(p.numel() for p in params.values())
    trainable = sum(params[n].numel() for n in names)
    ids = {id(p): n for n, p in params.items()}
    units = [[ids[id(p)] for p in unit.parameters()] for unit in family.shard_units()]
    largest = max(units, key=lambda u: sum(params[n].numel() for n in u))
    dense = [family.mlp_weights(component, layer, slot) for layer, slot in family.mlp_places(component)]
    dense = [w for w in dense if w is not None]
    config = getattr(family.model, "config", None)
    if config is not None and hasattr(config, "hidden_size"):  # a MoT: grouped-query attention
        h = config.hidden_size
        kv = h * config.num_key_value_heads // config.num_attention_heads
    elif dense:  # e.g. an MMDiT: full attention at its MLPs' input width
        h = kv = dense[0].up.shape[1]
    else:
        raise ValueError(f"the {family.name} family's {component} states no hidden size and has no dense MLP")
    spec = family.moe_spec(component)
    width = max((w.up.shape[0] for w in dense), default=0)
    if spec:
        width = max(width, spec["expert_size"] * spec["top_k"] if "expert_size" in spec else 0)
    if tokens is None:
        tokens = math.prod(family.noise_shape(1)[1:-1]) + PROMPT_TOKENS
    return TuningSizes(
        total=total,
        trainable=trainable,
        largest_unit=sum(params[n].numel() for n in largest),
        largest_unit_trainable=sum(params[n].numel() for n in largest if n in names),
        layers=family.num_layers(component),
        hidden=h,
        kv_width=kv,
        mlp_width=int(width),
        tokens=int(tokens),
    )


# ------------------------------------------------------------------------------ from a config
def mot_sizes_from_config(model: dict, mode: str, moe: dict | None, imported: bool, keep: float = 1.0) -> TuningSizes:
    """A MoT's tuning sizes from the config's ``model:`` (both towers' attention and MLPs per layer,
    the embedding and head when ``vocab_size`` is given) and the tuning: ``mode`` frozen (routers
    only) or full (the generation MLPs: an MoE partition's ``moe`` spec, or dense), on the
    generation component with its dense layers (``moe.dense_layers``) left untuned; ``keep``: the
    share of the generation MLPs' width a static cut kept. ``imported``:
    BAGEL's geometry (its image side unless ``model.image_size`` says otherwise, the FLUX latent
    grid); else the trained default's (the shapes world's canvas, ``GEOMETRY_DEFAULTS``)."""
    from .sizes import (
        BAGEL_IMAGE_SIZE,
        BAGEL_LATENT_DOWNSAMPLE,
        BAGEL_LATENT_PATCH_SIZE,
        GEOMETRY_DEFAULTS,
        moe_layers,
    )
    from .worlds.scenes import CANVAS

    h, layers = model["hidden_size"], model["num_hidden_layers"]
    kv = h * model["num_key_value_heads"] // model["num_attention_heads"]
    und_width = model["intermediate_size"]
    gen_width = int(model.get("gen_intermediate_size", und_width) * keep)
    attention = 2 * h * h + 2 * h * kv
    layer = sum(attention + 3 * h * w for w in (und_width, gen_width))
    total = layers * layer + 2 * model.get("vocab_size", 0) * h
    tuned = moe_layers(layers, moe.get("dense_layers", "first_last")) if moe else list(range(layers))
    experts = moe.get("num_experts") if moe else None
    router = h * experts if experts else 0
    if mode == "frozen":
        trainable, unit_trainable = len(tuned) * router, router
    else:
        trainable, unit_trainable = len(tuned) * (3 * h * gen_width + router), 3 * h * gen_width + router
    active = gen_width * moe["top_k"] / experts if experts else gen_width
    if imported:
        side, step = model.get("image_size", BAGEL_IMAGE_SIZE), BAGEL_LATENT_DOWNSAMPLE * BAGEL_LATENT_PATCH_SIZE
    else:
        geometry = {**GEOMETRY_DEFAULTS, **model}
        side, step = CANVAS, geometry["latent_downsample"] * geometry["latent_patch_size"]
    grid = side // step
    return TuningSizes(
        total=total + trainable if mode == "frozen" else total + router * len(tuned),
        trainable=trainable,
        largest_unit=layer + router,
        largest_unit_trainable=unit_trainable,
        layers=layers,
        hidden=h,
        kv_width=kv,
        mlp_width=int(active),
        tokens=grid * grid + PROMPT_TOKENS,
    )


def tuning_jobs(config: dict) -> list[dict]:
    """The tuning jobs a config's DAG plans: each MoE partition's frozen and full tunings and the
    tuned controls (dense and static cut: a dense MLP tuned in full), with their settings."""
    moe = config.get("moe") or {}
    tune = moe.get("tune") or {}
    jobs = []
    for part in moe.get("partitions", []):
        spec = {**part, "dense_layers": moe.get("dense_layers", "first_last")}
        for mode in moe.get("tunings", []):
            if mode in ("frozen", "full"):
                name = f"moe {part['num_experts']}/{part['top_k']} {mode}"
                jobs.append({"name": name, "mode": mode, "moe": spec, "settings": tune.get(mode, {})})
    first = (moe.get("partitions") or [{}])[0]
    for control in moe.get("controls", []):
        # the static cut keeps the first partition's active share of every MLP (rules/moe.smk)
        keep = first["top_k"] / first["num_experts"] if control == "static" and first else 1.0
        jobs.append({"name": f"control {control} full", "mode": "full", "moe": None, "keep": keep,
                     "settings": tune.get("full", {})})  # fmt: skip
    return jobs


def config_plans(config: dict, gpus: int | None = None, gpu_mem_gb: float | None = None) -> list[dict]:
    """Each tuning job of a MoT config with its plan on the GPUs ``resources.tune`` asks for (or
    ``gpus``), the GPU memory it names (or ``gpu_mem_gb``), and the fewest GPUs that fit."""
    from .tune_settings import TUNE_DEFAULTS

    model = config.get("model") or {}
    if model.get("family", "mot") != "mot":
        return []
    resources = config.get("resources") or {}
    kind = {**resources.get("default", {}), **resources.get("tune", {})}
    gpus = gpus or max(1, int(kind.get("gpus", 0)) * int(kind.get("nodes", 1)))
    gpu_mem = gpu_mem_gb or kind.get("gpu_mem_gb")
    dtype = (config.get("runtime") or {}).get("dtype", "float32")
    device = "cuda" if int(kind.get("gpus", 0)) > 0 else "cpu"
    imported = (config.get("checkpoint") or {}).get("source", "train") != "train"
    rows = []
    for job in tuning_jobs(config):
        s = job["settings"]
        settings = dict(
            dtype=dtype,
            master_dtype=s.get("master_dtype", TUNE_DEFAULTS["master_dtype"]),
            activation_checkpointing=bool(s.get("activation_checkpointing", TUNE_DEFAULTS["activation_checkpointing"])),
            device=device,
        )
        batch = int(s.get("batch_gen", TUNE_DEFAULTS["batch_gen"]))
        sizes = mot_sizes_from_config(model, job["mode"], job["moe"], imported, job.get("keep", 1.0))
        result = plan(sizes, gpus=gpus, batch=batch, **settings)
        rows.append(
            {
                "job": job["name"],
                "gpus": gpus,
                "gpu_mem_gb": gpu_mem,
                "plan": result,
                "fits": fits(result, gpu_mem) if gpu_mem else None,
                "smallest_fit": smallest_fit(sizes, gpu_mem, batch, **settings) if gpu_mem else None,
                "sizes": asdict(sizes),
            }
        )
    return rows


def check_config(config: dict) -> None:
    """Refuse (``ValueError`` naming the numbers) a config whose tuning jobs exceed the GPUs
    ``resources.tune`` asks for; nothing to check where it names no ``gpu_mem_gb``."""
    problems = []
    for row in config_plans(config):
        if row["fits"] is False:
            fewest = row["smallest_fit"]
            hint = f"the fewest GPUs that fit: {fewest}" if fewest else "no GPU count up to 1024 fits"
            problems.append(f"{row['job']}: {describe(row['plan'], row['gpus'], row['gpu_mem_gb'])}; {hint}")
    if problems:
        raise ValueError(
            "resources.tune: the tuning jobs do not fit the GPUs they ask for (unisparse memory-plan prints "
            "the plan; raise gpus or nodes, or set activation_checkpointing in moe.tune): " + " | ".join(problems)
        )
