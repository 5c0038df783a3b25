"""Aggregate metrics JSON files into one tidy CSV: a row per variant x task x metric, with the
score's standard error (NaN for metrics files written before scores carried one)."""
from __future__ import annotations


import pandas as pd

from .io import atomic_path, read_json

TASK_KEYS = {"understanding": "ShapesQA", "generation": "ShapesGenEval"}


def rows_of(metrics: dict) -> list[dict]:
    variant = dict(metrics.get("variant", {}))
    cost = {}
    for kind in ("total", "active"):
        for comp, n in metrics["parameters"][kind].items():
            cost[f"params_{kind}_{comp}"] = n
    for comp, f in metrics["flops_per_token"].items():
        cost[f"flops_per_token_{comp}"] = f
    cost["latency_gen_s_per_image"] = metrics["latency"]["gen_seconds_per_image"]
    cost["latency_und_s_per_item"] = metrics["latency"]["und_seconds_per_item"]
    extra = {f"load_{k}": v for k, v in metrics.get("expert_load", {}).items()}
    rows = []
    for task, bench in TASK_KEYS.items():
        se = metrics[task].get("se", {})
        for metric, value in metrics[task].items():
            if metric.startswith("n_") or metric == "se":
                continue
            rows.append({**variant, "task": task, "benchmark": bench, "metric": metric, "value": value,
                         "se": se.get(metric, float("nan")), **cost, **extra})
    return rows


def aggregate(metric_files: list, out_csv) -> pd.DataFrame:
    rows = []
    for f in sorted(map(str, metric_files)):
        rows += rows_of(read_json(f))
    if not rows:
        raise ValueError("no metrics to aggregate")
    df = pd.DataFrame(rows)
    # grid coordinates first, then the measurement, then cost columns
    cost_prefixes = ("params_", "flops_", "latency_", "load_")
    front = [c for c in ("stage", "variant_id") if c in df.columns]
    measure = ["task", "benchmark", "metric", "value", "se"]
    cost = [c for c in df.columns if c.startswith(cost_prefixes)]
    grid = sorted(c for c in df.columns if c not in front + measure + cost)
    df = df[front + grid + measure + cost]
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df
