"""End-to-end image sampling time of whole models (e.g. dense, 50%-width, MoE 16-to-8), one run.

    python benchmarks/sampling.py results/models/dense \\
        results/models/width/gen/cal-gen/act_norm/keep0.5 \\
        results/models/moe/gen/E16-k8-snake-paper-s0/full

Each model samples the same prompts with the same seeds and settings (the evaluation's sampler:
Euler steps with classifier-free guidance); times are medians over repeats after a warm-up, taken
in one process, and reported as a ratio to the first model. ``OMP_WAIT_POLICY=PASSIVE`` is set
unless the environment sets it (see benchmarks/moe_mlp.py for why).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from unisparse.accounting import parameter_counts  # noqa: E402
from unisparse.io import load_model  # noqa: E402
from unisparse.runtime import DTYPES, describe, resolve_device, resolve_dtype, synchronize  # noqa: E402
from unisparse.worlds import shapes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories; the first is the reference")
    ap.add_argument("--images", type=int, default=64, help="images per timed call (one batch)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    pairs = shapes.geneval_set("eval", 1, None, 0)[: args.images]
    ids = [shapes.encode(p.text) for p, _ in pairs]
    seeds = [s for _, s in pairs]
    print(describe(device, dtype))
    print(f"threads={args.threads} images={len(ids)} steps={args.steps} cfg={args.cfg} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} load={os.getloadavg()[0]:.2f}")
    ref = None
    print(f"{'model':70s} {'gen active':>10s} {'ms/image':>9s} {'speedup':>8s}")
    for path in args.models:
        model = load_model(path, device=device, dtype=dtype)
        model.generate_images(ids, seeds, num_steps=args.steps, cfg_scale=args.cfg)  # warm-up
        times = []
        for _ in range(args.repeats):
            synchronize(device)
            t0 = time.perf_counter()
            model.generate_images(ids, seeds, num_steps=args.steps, cfg_scale=args.cfg)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        ms = 1000 * statistics.median(times) / len(ids)
        ref = ref or ms
        active = parameter_counts(model)["active"]["gen"]
        print(f"{path[-70:]:70s} {active:10d} {ms:9.3f} {ref / ms:7.2f}x")


if __name__ == "__main__":
    main()
