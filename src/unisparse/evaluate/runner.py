"""Evaluate a model on both tasks; record scores, parameter counts, FLOPs and measured latency."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from ..accounting import flops_per_token, parameter_counts
from ..benchmarks import DEFAULT_BENCHMARKS, check_benchmarks
from ..families import family_for, load_family
from ..models.sampling import SAMPLER_DEFAULTS, sampler_settings
from ..runtime import describe, synchronize
from ..spec import merge_spec
from ..worlds import shapes
from .generation import evaluate_generation
from .geneval import GENEVAL_DEFAULTS
from .mme import MME_DEFAULTS
from .understanding import answer_questions, evaluate_understanding

log = logging.getLogger(__name__)

EVAL_DEFAULTS = dict(
    benchmarks=DEFAULT_BENCHMARKS,
    qa_items=1000,
    qa_seed=1,
    samples_per_prompt=4,
    max_prompts_per_tag=24,  # the evaluation split has up to 1,848 prompts per category (color_attr)
    gen_seed=0,
    **SAMPLER_DEFAULTS,
    batch_size=128,
    threads=2,
    latency_repeats=3,
    # the real benchmarks' own settings (read only when `benchmarks` names them)
    **{k: GENEVAL_DEFAULTS[k] for k in ("geneval_prompts", "detector", "detector_revision", "clip", "clip_revision")},
    **{k: v for k, v in MME_DEFAULTS.items() if k != "batch_size"},
)


def _median_seconds(fn, repeats: int, device) -> float:
    """Median wall time of ``fn`` after one warm-up call, the device synchronised around each call
    (an asynchronous device would otherwise be timed while it still works)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def evaluate_model(family, spec: dict | None = None, progress: bool = False, artifacts_dir=None) -> dict:
    """Scores of both tasks on the benchmarks the settings name (ShapesQA and ShapesGenEval by default)
    plus cost figures. ``family``: the model's adapter (``families``; a bare MoT model is wrapped, with
    the shapes vocabulary); ``artifacts_dir``: where a benchmark keeps what it made besides scores
    (GenEval's images)."""
    family = family_for(family)
    spec = merge_spec(EVAL_DEFAULTS, spec, "evaluation")
    spec["benchmarks"] = check_benchmarks(spec["benchmarks"])
    torch.set_num_threads(int(spec["threads"]))
    family.eval()
    tokenizer = family.tokenizer
    device = family.device
    sampler = sampler_settings(spec)
    t0 = time.perf_counter()
    if spec["benchmarks"]["und"] == "mme":
        from .mme import run_mme

        qa = run_mme(family, tokenizer, spec, progress)
        qa["overall"] = qa["total"]  # MME's own scale: the sum of the 14 subtask scores (max 2800)
        und_seconds_per_item = (time.perf_counter() - t0) / max(qa["n_items"], 1)
    else:
        items = shapes.qa_set("eval", spec["qa_items"], spec["qa_seed"])
        qa = evaluate_understanding(family, items, spec["batch_size"])
        lat_und = _median_seconds(lambda: answer_questions(family, items[:256], 256), spec["latency_repeats"], device)
        und_seconds_per_item = lat_und / min(256, len(items))
    t1 = time.perf_counter()
    if spec["benchmarks"]["gen"] == "geneval":
        from .geneval import run_geneval

        if artifacts_dir is None:
            raise ValueError("GenEval writes its images and per-image results: give an artifacts directory")
        gen = run_geneval(family, tokenizer, spec, Path(artifacts_dir) / "geneval", progress)
        gen.pop("per_image")  # in {artifacts_dir}/geneval/results.jsonl
        probe_ids = [tokenizer.encode(t) for t in ("a photo of a cat", "a photo of a red car and a blue bench")]
    else:
        pairs = shapes.geneval_set("eval", spec["samples_per_prompt"], spec["max_prompts_per_tag"], spec["gen_seed"])
        gen = evaluate_generation(family, pairs, sampler, spec["batch_size"], progress)
        probe_ids = [family.encode(p.text) for p, _ in pairs[: min(32, len(pairs))]]
    t2 = time.perf_counter()
    seeds = list(range(len(probe_ids)))
    lat_gen = _median_seconds(
        lambda: family.generate_images(probe_ids, seeds, **sampler), spec["latency_repeats"], device
    )
    log.info(
        "%s overall %.4f; %s overall %.4f",
        spec["benchmarks"]["und"],
        qa["overall"],
        spec["benchmarks"]["gen"],
        gen["overall"],
    )
    return {
        "understanding": qa,
        "generation": gen,
        "parameters": parameter_counts(family),
        "flops_per_token": flops_per_token(family),
        "latency": {
            "gen_seconds_per_image": lat_gen / len(probe_ids),
            "und_seconds_per_item": und_seconds_per_item,
            "eval_seconds_und": t1 - t0,
            "eval_seconds_gen": t2 - t1,
            "repeats": spec["latency_repeats"],
            **describe(device, family.dtype),
        },
        "eval": spec,
    }


def evaluate_model_dir(
    model_dir, spec: dict | None = None, progress: bool = False, device=None, dtype=None, artifacts_dir=None
) -> dict:
    metrics = evaluate_model(
        load_family(model_dir, device=device, dtype=dtype), spec, progress, artifacts_dir=artifacts_dir
    )
    metrics["model_dir"] = str(model_dir)
    return metrics
