"""One generation-tower decoder layer at BAGEL's shape: dense MLP vs MoE vs static 50% width.

The layer is the project's own ``MoTDecoderLayer`` (random weights) run as in one guided denoising
step of ``generate_images``: a classifier-free-guidance pair (conditional and unconditional rows),
each with ``--latents`` latent tokens between BAGEL's two image markers, attending jointly to
themselves and to a short prompt held in the KV cache (the unconditional row sees none of it), then
the generation tower's MLP on the latent tokens. Only the generation MLP differs between variants
(the same attention weights, the MLPs cut from the same dense one); MoE routers are random and
non-zero so routing is spread as after training.

Timed in one process, rounds interleaved, median of ``--repeats`` after warm-up; ratio = dense /
variant. "projected step" applies the layer ratio to a ``--total-layers`` model whose first and last
layers stay dense (the paper's MoE keeps them dense): ``L * dense / (2 * dense + (L - 2) * variant)``.

    python benchmarks/generation_layer.py --device cuda                       # BAGEL shape, bf16
    python benchmarks/generation_layer.py --device cpu --shape scaled         # CPU-sized
    python benchmarks/generation_layer.py --device cuda --moe 16:8 32:16 --dispatch nosync
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from unisparse.models.configuration_mot import MoTConfig  # noqa: E402
from unisparse.models.modeling_mot import MoTDecoderLayer, SwiGLUMLP, rope_cos_sin  # noqa: E402
from unisparse.models.moe_dispatch import choose_dispatch  # noqa: E402
from unisparse.moe import DISPATCHES, dense_to_moe, make_moe_spec, partition_neurons  # noqa: E402

# hidden, MLP width, attention heads, KV heads, head dim, latent tokens per image
SHAPES = {
    "bagel": dict(hidden=3584, width=18944, heads=28, kv_heads=4, head_dim=128, latents=4096),
    "scaled": dict(hidden=1024, width=4096, heads=8, kv_heads=2, head_dim=128, latents=1024),
    "tiny": dict(hidden=64, width=32, heads=4, kv_heads=2, head_dim=16, latents=64),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_layer(s, device, dtype, seed=0):
    config = MoTConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["width"],
        num_hidden_layers=1,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
    )
    torch.manual_seed(seed)
    layer = MoTDecoderLayer(config, 0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.02)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    return config, layer.to(device=device, dtype=dtype).eval()


def gen_mlps(dense: SwiGLUMLP, moes, dispatch: str, seed=0) -> dict:
    """The generation-MLP variants, all cut from ``dense``."""
    hidden, width = dense.gate_proj.weight.shape[1], dense.gate_proj.weight.shape[0]
    half = SwiGLUMLP(hidden, width // 2).to(dense.gate_proj.weight)
    with torch.no_grad():  # the first half of the neurons (which half does not change the time)
        half.gate_proj.weight.copy_(dense.gate_proj.weight[: width // 2])
        half.up_proj.weight.copy_(dense.up_proj.weight[: width // 2])
        half.down_proj.weight.copy_(dense.down_proj.weight[:, : width // 2])
    out = {"dense": dense, "static 50%": half}
    g = torch.Generator().manual_seed(seed)
    for E, k in moes:
        shared, parts = partition_neurons(torch.rand(width, generator=g), E, method="snake")
        moe = dense_to_moe(dense, shared, parts, make_moe_spec([0], E, k, width // E, dispatch=dispatch))
        with torch.no_grad():
            moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) * hidden**-0.5)
        out[f"moe {E}-to-{k} {dispatch}"] = moe
    return out


def step_inputs(config, s, prompt: int, device, dtype):
    """Hidden states, tower rows, rope, mask and prompt KV cache of one guided step (B = 2)."""
    B, L = 2, s["latents"]
    T = L + 2  # <vision_start> latents <vision_end>
    h = torch.randn(B, T, s["hidden"], device=device, dtype=dtype)
    flat = torch.arange(B * T, device=device).view(B, T)
    rows = {"und": flat[:, [0, T - 1]].reshape(-1), "gen": flat[:, 1 : T - 1].reshape(-1)}
    pos = torch.full((B, T), prompt, device=device)
    cos, sin = rope_cos_sin(pos, config.head_dim, config.rope_theta, dtype)
    k = torch.randn(B, s["kv_heads"], prompt, s["head_dim"], device=device, dtype=dtype)
    v = torch.randn_like(k)
    valid = torch.zeros(B, prompt, dtype=torch.bool, device=device)
    valid[0] = True  # the unconditional row keeps the keys but sees none of them
    mask = torch.ones(B, T, prompt + T, dtype=torch.bool, device=device)
    return h, rows, cos, sin, mask, (k, v, valid)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--shape", default=None, choices=list(SHAPES), help="default: bagel on CUDA, scaled on CPU")
    for key in SHAPES["bagel"]:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"override the shape's {key}")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens in the KV cache")
    ap.add_argument("--moe", nargs="+", default=["16:8", "32:16"], help="E:k pairs")
    ap.add_argument("--dispatch", default="auto", choices=list(DISPATCHES))
    ap.add_argument("--total-layers", type=int, default=28)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    s = dict(SHAPES[args.shape or ("bagel" if gpu else "scaled")])
    s.update({k: getattr(args, k) for k in s if getattr(args, k) is not None})
    torch.set_num_threads(args.threads)
    moes = [tuple(int(v) for v in p.split(":")) for p in args.moe]

    config, layer = build_layer(s, device, dtype)
    mlps = gen_mlps(layer.mlp_moe_gen, moes, args.dispatch)
    mlps = {name: m.to(device=device, dtype=dtype).eval() for name, m in mlps.items()}
    inputs = step_inputs(config, s, args.prompt, device, dtype)
    where = (
        torch.cuda.get_device_name(device) if gpu else f"CPU, {os.cpu_count()} cores, threads {torch.get_num_threads()}"
    )
    print(
        f"torch {torch.__version__}, {where}, {str(dtype).removeprefix('torch.')}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"one generation layer: hidden {s['hidden']}, MLP width {s['width']}, heads {s['heads']}/{s['kv_heads']}x"
        f"{s['head_dim']}, CFG pair x {s['latents']} latent tokens (+2 markers), {args.prompt} prompt tokens cached; "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )

    def run(mlp):
        layer.mlp_moe_gen = mlp
        with torch.inference_mode():
            return layer(*inputs[:5], past=inputs[5])[0]

    def run_mlp(mlp, x):
        with torch.inference_mode():
            return mlp(x)

    x_gen = torch.randn(2 * s["latents"], s["hidden"], device=device, dtype=dtype)
    for _ in range(args.warmup):
        for m in mlps.values():
            run(m), run_mlp(m, x_gen)
    times = {name: ([], []) for name in mlps}
    for _ in range(args.repeats):
        for name, m in mlps.items():
            for i, fn in enumerate((lambda: run(m), lambda: run_mlp(m, x_gen))):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name][i].append(time.perf_counter() - t0)
    med = {name: tuple(statistics.median(t) for t in pair) for name, pair in times.items()}
    L = args.total_layers
    header = (
        f"{'variant':>24} {'auto picks':>17} {'layer ms':>10} {'x dense':>8} {'MLP ms':>9} {'x dense':>8} "
        f"{f'projected step ({L - 2}/{L} layers)':>32}"
    )
    print(header)
    print("-" * len(header))
    d_layer, d_mlp = med["dense"]
    for name, (t_layer, t_mlp) in med.items():
        m = mlps[name]
        picks = choose_dispatch(x_gen, m.num_experts, m.top_k, m.expert_size) if name.endswith(" auto") else ""
        proj = L * d_layer / (2 * d_layer + (L - 2) * t_layer)
        print(
            f"{name:>24} {picks:>17} {1e3 * t_layer:>10.2f} {d_layer / t_layer:>7.2f}x {1e3 * t_mlp:>9.2f} "
            f"{d_mlp / t_mlp:>7.2f}x {proj:>31.2f}x",
            flush=True,
        )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
