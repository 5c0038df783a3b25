"""Forward latency of a converted MoE MLP against the dense MLP it came from, on CPU.

Variants per (shape, token count): the dense SwiGLU MLP, a static 50%-width SwiGLU MLP (the practical
ceiling for "half the active parameters"), and the MoE block (E=16, top-8, snake partition of the
dense MLP) with each dispatch. The router has random non-zero weights so routing is spread as after
training. Times are medians over repeats after warm-up, all in one process; speedup = dense / variant.

    python benchmarks/moe_mlp.py               # full table, 2 threads
    python benchmarks/moe_mlp.py --quick       # smoke run
    python benchmarks/moe_mlp.py --threads 1 --dispatches grouped grouped_mm loop

CPU timings swing with machine load; the load average is printed so a noisy table can be recognised.
On an oversubscribed machine (load above the core count) OpenMP's default spin-waiting makes every
parallel op cost a scheduler time slice (measured on a busy 2-core box with 2 threads: a 0.5 ms
elementwise op took 7 ms; at 4096 tokens of the scaled shape the MoE forward took 2.2 s against
0.44 s with passive waiting, the dense MLP 0.75 s against 0.71 s), which punishes the MoE's ~130
ops far more than the dense MLP's five. The script therefore sets ``OMP_WAIT_POLICY=PASSIVE``
unless the environment already sets it (it must be set before torch is imported).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting on purpose)

from unisparse.models.modeling_mot import SwiGLUMLP  # noqa: E402
from unisparse.moe import DISPATCHES, dense_to_moe, make_moe_spec, partition_neurons  # noqa: E402

SHAPES = {"tiny": (64, 256), "scaled": (1024, 4096)}  # (hidden H, MLP width I)


def median_ms(fn, x, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def build(hidden: int, width: int, experts: int, top_k: int, dispatches, seed: int = 0):
    torch.manual_seed(seed)
    dense = SwiGLUMLP(hidden, width)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=hidden**-0.5)
    half = SwiGLUMLP(hidden, width // 2)
    shared, parts = partition_neurons(torch.rand(width), experts, method="snake")
    variants = {"dense": dense, "half-width": half}
    for d in dispatches:
        moe = dense_to_moe(dense, shared, parts, make_moe_spec([0], experts, top_k, width // experts, dispatch=d))
        torch.manual_seed(seed + 1)
        torch.nn.init.normal_(moe.gate.weight, std=hidden**-0.5)  # trained-looking: spread routing
        variants[f"moe{top_k}/{experts} {d}"] = moe
    return variants


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dispatches", nargs="+", default=["grouped", "grouped_mm"], choices=list(DISPATCHES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 and 1024 tokens, 1 warm-up, 3 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.warmup, args.repeats = [256, 1024], 1, 3
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    header = f"{'shape':>18} {'tokens':>6} {'variant':>22} {'ms':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for shape in args.shapes:
            hidden, width = SHAPES[shape]
            variants = build(hidden, width, args.experts, args.top_k, args.dispatches)
            for n in args.tokens:
                x = torch.randn(n, hidden)
                outs = {name: m(x) for name, m in variants.items() if name.startswith("moe")}
                ref = next(iter(outs.values()))
                for name, y in outs.items():  # the dispatches must agree before their times mean anything
                    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), name
                dense_ms = None
                for name, m in variants.items():
                    ms = median_ms(m, x, args.warmup, args.repeats)
                    dense_ms = dense_ms or ms
                    print(f"{shape + f' {hidden}x{width}':>18} {n:>6} {name:>22} {ms:>9.2f} {dense_ms / ms:>7.2f}x", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
