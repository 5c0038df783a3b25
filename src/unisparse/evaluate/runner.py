"""Evaluate a model on both tasks; record scores, parameter counts, FLOPs and measured latency."""
from __future__ import annotations

import logging
import statistics
import time

import torch

from ..accounting import flops_per_token, parameter_counts
from ..io import load_model
from ..models import SAMPLER_DEFAULTS, sampler_settings
from ..runtime import describe, synchronize
from ..spec import merge_spec
from ..text import tokenizer_for
from ..worlds import shapes
from ..benchmarks import DEFAULT_BENCHMARKS, check_benchmarks
from .generation import evaluate_generation, generate_for
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


def evaluate_model(model, spec: dict | None = None, progress: bool = False, tokenizer=None, artifacts_dir=None) -> dict:
    """Scores of both tasks on the benchmarks the settings name (ShapesQA and ShapesGenEval by default)
    plus cost figures. ``tokenizer``: the model's (``text.tokenizer_for``; the shapes vocabulary if None);
    ``artifacts_dir``: where a benchmark keeps what it made besides scores (GenEval's images)."""
    spec = merge_spec(EVAL_DEFAULTS, spec, "evaluation")
    spec["benchmarks"] = check_benchmarks(spec["benchmarks"])
    torch.set_num_threads(int(spec["threads"]))
    model.eval()
    items = shapes.qa_set("eval", spec["qa_items"], spec["qa_seed"])
    pairs = shapes.geneval_set("eval", spec["samples_per_prompt"], spec["max_prompts_per_tag"], spec["gen_seed"])
    t0 = time.perf_counter()
    qa = evaluate_understanding(model, items, spec["batch_size"])
    t1 = time.perf_counter()
    sampler = sampler_settings(spec)
    gen = evaluate_generation(model, pairs, sampler, spec["batch_size"], progress)
    t2 = time.perf_counter()
    probe = pairs[: min(32, len(pairs))]
    device = model.device
    lat_gen = _median_seconds(lambda: generate_for(model, probe, sampler, len(probe)),
                              spec["latency_repeats"], device)
    lat_und = _median_seconds(lambda: answer_questions(model, items[:256], 256), spec["latency_repeats"], device)
    log.info("ShapesQA overall %.4f; ShapesGenEval overall %.4f", qa["overall"], gen["overall"])
    return {
        "understanding": qa,
        "generation": gen,
        "parameters": parameter_counts(model),
        "flops_per_token": flops_per_token(model),
        "latency": {
            "gen_seconds_per_image": lat_gen / len(probe),
            "und_seconds_per_item": lat_und / min(256, len(items)),
            "eval_seconds_und": t1 - t0,
            "eval_seconds_gen": t2 - t1,
            "repeats": spec["latency_repeats"],
            **describe(device, model.dtype),
        },
        "eval": spec,
    }


def evaluate_model_dir(model_dir, spec: dict | None = None, progress: bool = False, device=None, dtype=None,
                       artifacts_dir=None) -> dict:
    metrics = evaluate_model(load_model(model_dir, device=device, dtype=dtype), spec, progress,
                             tokenizer=tokenizer_for(model_dir), artifacts_dir=artifacts_dir)
    metrics["model_dir"] = str(model_dir)
    return metrics
