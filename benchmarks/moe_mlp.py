"""Latency of a converted MoE MLP against the dense MLP it came from, forward and forward+backward.

Variants per (shape, token count): the dense SwiGLU MLP, a static 50%-width SwiGLU MLP (the practical
ceiling for "half the active parameters"), and MoE blocks (E-to-k, snake partition of the dense MLP)
with each dispatch (``auto`` prints the path it picked). The router has random non-zero weights so
routing is spread as after training. All variants are timed in one process, interleaved round by
round (so drifting machine load hits them alike); times are medians over ``--repeats`` rounds after
warm-up; speedup = dense / variant. The dispatches must agree before their times are printed.

    python benchmarks/moe_mlp.py                          # CPU: tiny and scaled shapes, fp32
    python benchmarks/moe_mlp.py --quick                  # smoke run
    python benchmarks/moe_mlp.py --device cuda            # GPU: BAGEL's shape, bf16, 1024/4096/8192 tokens
    python benchmarks/moe_mlp.py --device cuda --moe 16:8 32:16 --dispatches auto nosync triton --no-backward

CPU timings swing with machine load; the load average is printed before and after so a noisy table
can be recognised. On an oversubscribed machine (load above the core count) OpenMP's default
spin-waiting makes every parallel op cost a scheduler time slice (measured on a busy 2-core box with
2 threads: a 0.5 ms elementwise op took 7 ms), which punishes the MoE's many small ops far more than
the dense MLP's five. The script therefore sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment
already sets it (it must be set before torch is imported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting on purpose)

from unisparse.models.blocks import SwiGLUMLP  # noqa: E402
from unisparse.models.moe_dispatch import choose_dispatch  # noqa: E402
from unisparse.moe import DISPATCHES, dense_to_moe, make_moe_spec, partition_neurons  # noqa: E402

SHAPES = {"tiny": (64, 256), "scaled": (1024, 4096), "bagel": (3584, 18944)}  # (hidden H, MLP width I)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(hidden, width, moes, dispatches, device, dtype, seed=0):
    torch.manual_seed(seed)
    dense = SwiGLUMLP(hidden, width)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=hidden**-0.5)
    half = SwiGLUMLP(hidden, width // 2)
    variants = {"dense": dense, "static 50%": half}
    for E, k in moes:
        shared, parts = partition_neurons(torch.rand(width), E, method="snake")
        for d in dispatches:
            moe = dense_to_moe(dense, shared, parts, make_moe_spec([0], E, k, width // E, dispatch=d))
            torch.manual_seed(seed + 1)
            torch.nn.init.normal_(moe.gate.weight, std=hidden**-0.5)  # trained-looking: spread routing
            variants[f"moe {E}-to-{k} {d}"] = moe
    return {name: m.to(device=device, dtype=dtype) for name, m in variants.items()}


def step(model, x, backward: bool, grad_out=None):
    if not backward:
        with torch.inference_mode():
            return model(x)
    x = x.detach().requires_grad_(True)
    y = model(x)
    torch.autograd.grad(y, [x, *model.parameters()], grad_out)
    return None


def time_all(variants, x, backward, warmup, repeats, device):
    """Median seconds per variant, rounds interleaved."""
    grad_out = torch.randn_like(x) if backward else None
    for _ in range(warmup):
        for m in variants.values():
            step(m, x, backward, grad_out)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, m in variants.items():
            sync(device)
            t0 = time.perf_counter()
            step(m, x, backward, grad_out)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def check_agreement(variants, x, dtype):
    outs = {name: step(m, x, False) for name, m in variants.items() if name.startswith("moe")}
    by_config = {}
    for name, y in outs.items():
        by_config.setdefault(name.rsplit(" ", 1)[0], []).append((name, y.float()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for group in by_config.values():
        ref = group[0][1]
        for name, y in group[1:]:  # the dispatches must agree before their times mean anything
            err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            assert err < tol, f"{name} disagrees with {group[0][0]}: relative error {err:.2e}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--tokens", type=int, nargs="+", default=None, help="default: 256 1024 4096 on CPU, 1024 4096 8192 on CUDA"
    )
    ap.add_argument(
        "--shapes", nargs="+", default=None, choices=list(SHAPES), help="default: tiny scaled on CPU, bagel on CUDA"
    )
    ap.add_argument("--moe", nargs="+", default=None, help="E:k pairs; default 16:8 on CPU, 16:8 32:16 on CUDA")
    ap.add_argument(
        "--dispatches",
        nargs="+",
        default=None,
        choices=list(DISPATCHES),
        help="default: every dispatch but loop (and triton off CUDA)",
    )
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, 1 warm-up, 3 repeats")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    tokens = args.tokens or ([1024, 4096, 8192] if gpu else [256, 1024, 4096])
    shapes = args.shapes or (["bagel"] if gpu else ["tiny", "scaled"])
    moes = [tuple(int(v) for v in s.split(":")) for s in (args.moe or (["16:8", "32:16"] if gpu else ["16:8"]))]
    dispatches = args.dispatches or [d for d in DISPATCHES if d != "loop" and (gpu or d != "triton")]
    if args.quick:
        tokens, args.warmup, args.repeats = [256], 1, 3
    torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name(device) if gpu else f"CPU, {os.cpu_count()} cores, threads {torch.get_num_threads()}"
    )
    print(
        f"torch {torch.__version__}, {where}, {str(dtype).removeprefix('torch.')}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average {os.getloadavg()[0]:.2f}, "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )
    passes = ["forward"] + ([] if args.no_backward else ["fwd+bwd"])
    header = f"{'shape':>18} {'tokens':>6} {'variant':>26} {'auto picks':>17}" + "".join(
        f" {p + ' ms':>12} {'x dense':>8}" for p in passes
    )
    print(header)
    print("-" * len(header))
    for shape in shapes:
        hidden, width = SHAPES[shape]
        variants = build(hidden, width, moes, dispatches, device, dtype)
        for n in tokens:
            x = torch.randn(n, hidden, device=device, dtype=dtype)
            check_agreement(variants, x, dtype)
            res = {p: time_all(variants, x, p == "fwd+bwd", args.warmup, args.repeats, device) for p in passes}
            for name, m in variants.items():
                picks = choose_dispatch(x, m.num_experts, m.top_k, m.expert_size) if name.endswith(" auto") else ""
                cells = "".join(f" {1e3 * res[p][name]:>12.3f} {res[p]['dense'] / res[p][name]:>7.2f}x" for p in passes)
                print(f"{shape + f' {hidden}x{width}':>18} {n:>6} {name:>26} {picks:>17}{cells}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
