"""BAGEL-7B-MoT's shapes with random weights: one generation step and one understanding prefill.

Builds the published configuration (``unisparse.models.bagel.published_config``: Qwen2.5-7B towers,
SigLIP so400m/14 with 26 layers, FLUX AE) with a reduced number of decoder layers, runs
  * one denoising step with classifier-free guidance on a 1024^2 image (2 x 4098 tokens through the
    decoder, the prompt in the KV cache), timed as the difference between 3-step and 1-step sampling
    (so prefill and the VAE decode cancel);
  * one understanding prefill of a 980^2 image (4900 ViT tokens) and a short question,
and prints time and peak device memory at two layer counts, from which it extrapolates to 28 layers
(the per-layer slope times 28 plus the rest). The full model's weights alone are 29.4 GB in bf16.

    python benchmarks/bagel_shape.py --device cuda --dtype bfloat16 --layers 1 2
    python benchmarks/bagel_shape.py --device cpu --dtype float32 --layers 1 2 --image-size 64 --vit-image-size 28
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from unisparse.models.bagel import published_config
from unisparse.models.modeling_mot import MoTForUnifiedModel
from unisparse.runtime import describe, synchronize


def build(layers: int, image_size: int, vit_image_size: int, device, dtype):
    config = published_config(image_size, vit_image_size)
    config.num_hidden_layers = layers
    with torch.device("meta"):
        model = MoTForUnifiedModel(config).to(dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # random weights of a sensible scale (norms at one), made on the device
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name or name.endswith("weight") else p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02))
    return model.eval()


def peak(fn, device):
    """(median seconds over 3 runs after a warm-up, peak device memory in GB of one run)."""
    fn()
    times = []
    for _ in range(3):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        mem = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        mem = float("nan")
    return statistics.median(times), mem


def measure(layers: int, args, device, dtype) -> dict:
    model = build(layers, args.image_size, args.vit_image_size, device, dtype)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    prompt = [list(range(1000, 1000 + args.prompt_tokens))]
    sample = dict(cfg_scale=4.0, cfg_interval=(0.0, 1.0), cfg_renorm="global")
    t1, m1 = peak(lambda: model.generate_images(prompt, [0], num_steps=1, **sample), device)
    t3, m3 = peak(lambda: model.generate_images(prompt, [0], num_steps=3, **sample), device)
    image = torch.rand(1, args.vit_image_size, args.vit_image_size, 3, device=device)
    with torch.no_grad():
        tu, mu = peak(
            lambda: model.understanding_logits(image, [list(range(2000, 2000 + args.question_tokens))]), device
        )
    model = None  # free the weights before the next size (the lambdas above hold the name, not the object)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "layers": layers,
        "weights_gb": weights_gb,
        "gen_step_s": (t3 - t1) / 2,
        "gen_peak_gb": max(m1, m3),
        "und_prefill_s": tu,
        "und_peak_gb": mu,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--layers", type=int, nargs=2, default=[1, 2], help="two reduced layer counts (for the slope)")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--vit-image-size", type=int, default=980)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--full-layers", type=int, default=28)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    runs = [measure(n, args, device, dtype) for n in args.layers]
    (a, b), dn = runs, args.layers[1] - args.layers[0]
    estimate = {}
    for key in ("gen_step_s", "und_prefill_s", "gen_peak_gb", "und_peak_gb", "weights_gb"):
        slope = (b[key] - a[key]) / dn
        estimate[key] = a[key] + slope * (args.full_layers - args.layers[0])
    result = {
        "device": describe(device, dtype),
        "image_size": args.image_size,
        "vit_image_size": args.vit_image_size,
        "runs": runs,
        f"estimate_{args.full_layers}_layers": estimate,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
