"""Tuning data: prepare throughput (images/s through the FLUX autoencoder) and the tuning step time with
pre-encoded latents against encoding the images in every step, measured in one run.

The model is BAGEL's: the published FLUX AE and one decoder layer at BAGEL-7B-MoT's layer shape
(Qwen2.5-7B: hidden 3584, MLP 18944, 28 heads, 4 KV heads; ``--layers``, ``--hidden`` and ``--width``
change it), a small vocabulary and a one-layer SigLIP (neither is used by generation), random weights.
Full tuning of the generation tower's MLPs, ``--batch`` images of ``--image-size`` pixels per step.

    python benchmarks/tune_data.py --device cpu --dtype float32 --image-size 128 --images 8 --steps 5
    python benchmarks/tune_data.py --device cuda --dtype bfloat16 --image-size 512 --images 64 --steps 10
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from unisparse.families.mot import MoTFamily
from unisparse.models.bagel import published_config
from unisparse.models.modeling_mot import MoTForUnifiedModel
from unisparse.moe.tune import tune_moe
from unisparse.runtime import describe, synchronize
from unisparse.tunedata.latents import LatentSet
from unisparse.tunedata.prepare import check_settings, prepare_tune_data
from unisparse.tunedata.sources import read_records


class ByteTokenizer:
    """Captions as bytes (the benchmark needs token ids, not a real vocabulary)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def build(args, device, dtype) -> MoTFamily:
    config = published_config(args.image_size, 28)
    config.num_hidden_layers, config.vocab_size = args.layers, 1024
    for i, name in enumerate(
        ("bos_token_id", "eos_token_id", "pad_token_id", "image_start_token_id", "image_end_token_id")
    ):
        setattr(config, name, 1000 + i)  # inside the small vocabulary (captions are bytes: ids < 256)
    config.hidden_size, config.intermediate_size = args.hidden, args.width
    config.vit_config = {**config.vit_config, "num_hidden_layers": 1}
    with torch.device("meta"):
        model = MoTForUnifiedModel(config).to(dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02))
    return MoTFamily(model.eval(), ByteTokenizer())


def write_tar(path: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            image = (rng.uniform(0, 1, (size + 16, size + 32, 3)) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=90)
            caption = json.dumps({"prompt": f"a test image number {i} with noise"}).encode()
            for name, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.json", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def step_seconds(family, args, **data) -> float:
    """Seconds per step of full tuning: the time of ``--steps`` steps minus that of one step, over
    ``--steps - 1`` (the first step's allocations, AdamW's state included, cancel), the median of
    ``--repeats`` such pairs (weights reset before each run)."""
    state = {k: v.clone() for k, v in family.model.state_dict().items()}

    def run(steps: int) -> float:
        family.model.load_state_dict(state)
        spec = {"steps": steps, "batch_gen": args.batch, "lr": 1e-5, "threads": torch.get_num_threads()}
        synchronize(family.device)
        return tune_moe(family, "gen", "full", spec, progress=False, **data)["seconds"]

    return statistics.median((run(args.steps) - run(1)) / (args.steps - 1) for _ in range(args.repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--width", type=int, default=18944)
    p.add_argument("--image-size", type=int, default=128, help="training resolution (a multiple of 16)")
    p.add_argument("--images", type=int, default=8, help="images prepared")
    p.add_argument("--batch", type=int, default=2, help="images per tuning step")
    p.add_argument("--steps", type=int, default=5, help="steps of the longer run (at least 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2 (the step time is the difference to a one-step run)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    family = build(args, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "raw").mkdir()
        write_tar(tmp / "raw" / "a.tar", args.images, args.image_size)
        settings = {"source": "webdataset", "batch_size": args.batch, "shard_size": 64}
        prepare_times = []
        for r in range(args.repeats):
            records = read_records(tmp / "raw", check_settings(settings), Counter())
            synchronize(device)
            t0 = time.perf_counter()
            prepare_tune_data(family, records, tmp / f"prepared{r}", settings, {}, progress=False)
            synchronize(device)
            prepare_times.append(time.perf_counter() - t0)
        data = LatentSet(tmp / "prepared0")
        with torch.no_grad():
            images = [family.decode_latents(data.rows([i])[0])[0].float().cpu() for i in range(len(data))]
        captions = data.captions()

        def examples(rng, n):
            picks = rng.integers(0, len(images), n)
            return [(SimpleNamespace(text=captions[i]), images[i].numpy()) for i in picks]

        with_latents = step_seconds(family, args, data=data)
        encoding = step_seconds(family, args, examples=examples)
    prepare_s = statistics.median(prepare_times)
    result = {
        "device": describe(device, dtype),
        "shape": {"layers": args.layers, "hidden": args.hidden, "width": args.width, "image_size": args.image_size},
        "prepare_images_per_s": args.images / prepare_s,
        "step_s_pre_encoded": with_latents,
        "step_s_encoding_each_step": encoding,
        "speedup_pre_encoded": encoding / with_latents,
        "batch": args.batch,
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
