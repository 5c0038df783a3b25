"""Aggregate metrics JSON files into one tidy CSV: a row per variant x task x metric, with the
score's standard error (NaN for metrics files written before scores carried one)."""

from __future__ import annotations

import pandas as pd

from .io import atomic_path, read_json

TASKS = {"understanding": "und", "generation": "gen"}
#: the benchmarks' names in tables and figures (keys: ``unisparse.benchmarks.BENCHMARKS``)
BENCHMARK_NAMES = {"shapesqa": "ShapesQA", "shapes_geneval": "ShapesGenEval", "mme": "MME", "geneval": "GenEval"}
#: nested score tables flattened into rows: GenEval's tags, MME's subtasks (their ``score``)
NESTED = {"per_tag": None, "per_subtask": "score"}


def scores_of(task_metrics: dict) -> dict[str, tuple[float, float]]:
    """{metric: (value, se)} of one task's metrics: its scalar scores (counts ``n_*`` left out) and the
    entries of its nested per-category tables; the standard error where the benchmark gives one."""
    se = task_metrics.get("se", {})
    out = {}
    for key, value in task_metrics.items():
        if key.startswith("n_") or key == "se" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = (value, se.get(key, float("nan")))
        elif key in NESTED and isinstance(value, dict):
            field, nested_se = NESTED[key], se.get(key, se)
            for name, v in value.items():
                s_ = nested_se.get(name, float("nan"))
                out[name] = (v[field], s_[field]) if field else (v, s_)
    return out


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
    chosen = metrics.get("eval", {}).get("benchmarks") or {"und": "shapesqa", "gen": "shapes_geneval"}
    rows = []
    for task, short in TASKS.items():
        bench = BENCHMARK_NAMES[chosen[short]]
        for metric, (value, se) in scores_of(metrics[task]).items():
            rows.append(
                {
                    **variant,
                    "task": task,
                    "benchmark": bench,
                    "metric": metric,
                    "value": value,
                    "se": se,
                    **cost,
                    **extra,
                }
            )
    return rows


#: what every metrics file holds (``evaluate.runner.evaluate_model``'s output)
REQUIRED = ("understanding", "generation", "parameters", "flops_per_token", "latency")


def metrics_rows(path) -> list[dict]:
    """The rows of one metrics file; a ValueError naming the file for anything that is not one
    (invalid JSON, ``{}``, a missing or malformed section)."""
    try:
        metrics = read_json(path)
    except ValueError as e:  # OS errors (a symlink loop, a missing file) name the file themselves
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: not a metrics file (a JSON {type(metrics).__name__}, not an object)")  # noqa: TRY004
    missing = [k for k in REQUIRED if k not in metrics]
    if missing:
        raise ValueError(f"{path}: not a metrics file (no {', '.join(missing)})")
    try:
        return rows_of(metrics)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: malformed metrics file ({type(e).__name__}: {e})") from None


def aggregate(metric_files: list, out_csv) -> pd.DataFrame:
    rows = []
    for f in sorted(map(str, metric_files)):
        rows += metrics_rows(f)
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
