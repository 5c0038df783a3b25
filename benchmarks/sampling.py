"""End-to-end image sampling time of whole models (e.g. dense, 50%-width, MoE 16-to-8), one run.

    python benchmarks/sampling.py results/models/dense \\
        results/models/width/gen/cal-gen/act_norm/keep0.5 \\
        results/models/moe/gen/E16-k8-snake-paper-s0/full
    python benchmarks/sampling.py --tiny                       # no trained models needed (see below)
    python benchmarks/sampling.py --tiny --dispatches auto dense_equivalent nosync grouped

Each model samples the same prompts with the same seeds and settings (the evaluation's sampler:
Euler steps with classifier-free guidance); times are medians over repeats after a warm-up, taken
in one process with the models' calls interleaved round by round, and reported as a ratio to the
first model. Every MoE model is timed once per dispatch in ``--dispatches`` (default: ``auto``,
the models' default), and its images must agree with the first dispatch's.

``--tiny`` builds the embedded default's tiny model (``workflow/config/tiny.yaml``'s sizes, random
weights) and converts its generation MLPs to MoE 16-to-8 and 32-to-16 like the pipeline (snake
partition, paper router, every layer converted) with random non-zero routers so routing is spread
as after training; timing depends on the shapes, not on what the weights learned.
``OMP_WAIT_POLICY=PASSIVE`` is set unless the environment sets it (see benchmarks/moe_mlp.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from unisparse.accounting import parameter_counts  # noqa: E402
from unisparse.models.moe_block import DISPATCHES, MoEMLP  # noqa: E402
from unisparse.runtime import DTYPES, describe, resolve_device, resolve_dtype, synchronize  # noqa: E402
from unisparse.worlds import shapes  # noqa: E402

TINY_CONFIG = Path(__file__).resolve().parents[1] / "workflow" / "config" / "tiny.yaml"


def tiny_models(device, dtype) -> dict:
    import yaml

    from unisparse.moe.convert import convert_to_moe
    from unisparse.train import build_model

    spec = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    dense = build_model(spec, seed=0).eval()
    models = {"tiny dense": dense}
    for E, k in ((16, 8), (32, 16)):
        moe = convert_to_moe(dense, "gen", E, k, method="snake", dense_layers="none")
        g = torch.Generator().manual_seed(E)
        with torch.no_grad():
            for m in moe.modules():
                if isinstance(m, MoEMLP):
                    m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g) * m.hidden_size**-0.5)
        models[f"tiny moe {E}-to-{k}"] = moe.eval()
    return {name: m.to(device=device, dtype=dtype) for name, m in models.items()}


def with_dispatch(model, dispatch: str) -> None:
    for m in model.modules():
        if isinstance(m, MoEMLP):
            m.dispatch = dispatch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model directories; the first is the reference")
    ap.add_argument("--tiny", action="store_true", help="build the tiny dense model and its MoE conversions in-process")
    ap.add_argument(
        "--dispatches",
        nargs="+",
        default=["auto"],
        choices=list(DISPATCHES),
        help="dispatches to time each MoE model with",
    )
    ap.add_argument("--images", type=int, default=64, help="images per timed call (one batch)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    args = ap.parse_args()
    if not args.models and not args.tiny:
        ap.error("give model directories or --tiny")
    torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    pairs = shapes.geneval_set("eval", 1, None, 0)[: args.images]
    ids = [shapes.encode(p.text) for p, _ in pairs]
    seeds = [s for _, s in pairs]
    print(describe(device, dtype))
    print(
        f"threads={args.threads} images={len(ids)} steps={args.steps} cfg={args.cfg} repeats={args.repeats} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} load={os.getloadavg()[0]:.2f}"
    )

    models = tiny_models(device, dtype) if args.tiny else {}
    if args.models:
        from unisparse.models.loading import load_model

        models.update({path[-60:]: load_model(path, device=device, dtype=dtype) for path in args.models})
    runs = []  # (label, model, dispatch or None)
    for name, model in models.items():
        is_moe = any(isinstance(m, MoEMLP) for m in model.modules())
        runs += [(f"{name} [{d}]", model, d) for d in args.dispatches] if is_moe else [(name, model, None)]

    def sample(model, dispatch):
        if dispatch is not None:
            with_dispatch(model, dispatch)
        return model.generate_images(ids, seeds, num_steps=args.steps, cfg_scale=args.cfg)

    first = {}
    for label, model, d in runs:  # warm-up, and the dispatches of one model must agree
        images = sample(model, d)
        ref = first.setdefault(id(model), images)
        torch.testing.assert_close(images, ref, atol=1e-3, rtol=1e-3, msg=lambda m, label=label: f"{label}: {m}")
    times = {label: [] for label, _, _ in runs}
    for _ in range(args.repeats):
        for label, model, d in runs:
            synchronize(device)
            t0 = time.perf_counter()
            sample(model, d)
            synchronize(device)
            times[label].append(time.perf_counter() - t0)
    ref_ms = None
    print(f"{'model':64s} {'gen active':>10s} {'ms/image':>9s} {'speedup':>8s}")
    for label, model, _ in runs:
        ms = 1000 * statistics.median(times[label]) / len(ids)
        ref_ms = ref_ms or ms
        active = parameter_counts(model)["active"]["gen"]
        print(f"{label[-64:]:64s} {active:10d} {ms:9.3f} {ref_ms / ms:7.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
