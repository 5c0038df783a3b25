"""Bytes the paper DAG's derived models hold in ``results/``: full copies against deltas, computed from
BAGEL-7B-MoT's sizes and ``workflow/config/paper.yaml``'s grids (nothing is built or measured).

A full copy is the dense model's file (``ema.safetensors`` + ``ae.safetensors`` of the lock) less
what the variant removed; a delta (``unisparse.deltas``) holds the gather indices of every tensor
made of the parent's rows or columns (int64), the tensors that are new (bf16) and a JSON plan of
about 100 bytes per tensor.

    python benchmarks/delta_bytes.py
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BF16, INDEX, PLAN = 2, 8, 100


def grid(sweep: dict, keys) -> list[tuple]:
    """Every combination of a sweep's values (a scalar is one value)."""
    return list(itertools.product(*(sweep[k] if isinstance(sweep[k], list) else [sweep[k]] for k in keys)))


def main() -> None:
    config = yaml.safe_load((REPO / "workflow/config/paper.yaml").read_text())
    lock = json.loads((REPO / config["checkpoint"]["lock"]).read_text())["files"]
    dense = lock["ema.safetensors"]["size"] + lock["ae.safetensors"]["size"]
    m = config["model"]
    h, width, layers = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
    kv = h * m["num_key_value_heads"] // m["num_attention_heads"]
    attention, mlp = (2 * h * h + 2 * h * kv) * BF16, 3 * h * width * BF16  # one tower's, per layer
    tensors = 1300  # the dense model's tensor count, for the plan's size (about 1,270)
    rows = {}

    for sweep in config["depth"]["sweeps"]:
        for comp, task, gran, drop in grid(sweep, ("component", "calib_task", "granularity", "drop")):
            if (comp, task) == ("gen", "und"):
                continue  # the generation tower computes nothing on understanding: not planned
            removed = drop * {"block": attention + mlp, "attn": attention, "mlp": mlp}[gran]
            rows.setdefault("depth", []).append((dense - removed, PLAN * tensors))
    for sweep in config["width"]["sweeps"]:
        for comp, task, _, keep in grid(sweep, ("component", "calib_task", "score", "keep_ratio")):
            if (comp, task) == ("gen", "und"):
                continue
            kept = int(keep * width)
            full = dense - layers * 3 * h * (width - kept) * BF16
            rows.setdefault("width", []).append((full, PLAN * tensors + layers * 3 * kept * INDEX))
    moe_layers = layers - 2  # first and last dense
    for part in config["moe"]["partitions"]:
        e = part["num_experts"]
        router = moe_layers * e * h * BF16
        indices = moe_layers * 5 * width * INDEX  # gate, up and down indices, and which parent fed each row
        rows.setdefault("moe (untuned)", []).append((dense + router, PLAN * tensors + indices + router))
        rows.setdefault("moe, routers tuned", []).append((dense + router, PLAN * tensors + router))
        rows.setdefault("moe, fully tuned", []).append((dense + router, PLAN * tensors + moe_layers * mlp + router))
    first = config["moe"]["partitions"][0]
    static_keep = first["top_k"] / first["num_experts"]
    rows["control: dense, tuned"] = [(dense, PLAN * tensors + layers * mlp)]
    static = int(static_keep * width)
    rows["control: static cut, tuned"] = [(dense - layers * 3 * h * (width - static) * BF16,
                                           PLAN * tensors + layers * 3 * h * static * BF16)]  # fmt: skip
    GB = 1e9
    total_full = total_delta = 0
    print(f"{'variant':<28} {'models':>6} {'full copies GB':>15} {'deltas GB':>10}")
    for name, items in rows.items():
        full, delta = sum(f for f, _ in items), sum(d for _, d in items)
        total_full, total_delta = total_full + full, total_delta + delta
        print(f"{name:<28} {len(items):>6} {full / GB:>15.1f} {delta / GB:>10.3f}")
    count = sum(len(v) for v in rows.values())
    print(f"{'all derived models':<28} {count:>6} {total_full / GB:>15.1f} {total_delta / GB:>10.3f}")
    print(f"(the dense model itself, {dense / GB:.1f} GB, is in results/ either way; DVC's cache holds as much again)")


if __name__ == "__main__":
    main()
