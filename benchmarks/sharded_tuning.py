"""Sharded tuning on the CPU (gloo): per-rank peak resident memory of two processes against one, the
tuned weights of both, the memory plan against the measured peaks, and the save's memory.

Builds a BAGEL-like MoT (both towers in every layer; default about 300 M parameters) whose generation
MLPs are split into 16 experts with 8 active (first and last layers dense), saves it in fp32, then
runs ``unisparse tune-moe --mode full`` as one process (the model loaded whole) and under
``torchrun --nproc-per-node 2`` (built on meta, each rank reading its rows, FSDP2), each in its own
interpreter, and prints:

* each run's per-process peak resident memory (``VmHWM``, logged by the verb) and their ratio;
* the largest relative difference of any tuned tensor, max|a - b| / max|b|;
* the memory plan (``unisparse.memplan``) of both runs next to the measured peaks, with the runtime
  overhead measured here as the peak of the same run on a three-layer model of hidden size 64;
* the saving rank's resident memory before and while the sharded model was written, against the
  largest unit.

    python benchmarks/sharded_tuning.py                 # ~300 M parameters, 3 steps
    python benchmarks/sharded_tuning.py --layers 4      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent


def build(directory: Path, layers: int, hidden: int, width: int, experts: int) -> None:
    from unisparse.io import save_model
    from unisparse.models.configuration_mot import MoTConfig
    from unisparse.models.modeling_mot import MoTForUnifiedModel
    from unisparse.moe.convert import convert_to_moe
    from unisparse.tasks import model_config_kwargs

    torch.manual_seed(0)
    config = MoTConfig(hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                       **model_config_kwargs())  # fmt: skip
    model = MoTForUnifiedModel(config).eval()
    if experts:
        model = convert_to_moe(model, "gen", experts, experts // 2, dense_layers="first_last")
    save_model(model, directory)


def weights(directory: Path) -> dict:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(str(path)))
    return found


def run(argv: list[str], env: dict) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def peaks(log: str) -> dict[int, float]:
    return {int(r): float(mb) for r, mb in re.findall(r"rank (\d+) peak resident memory (\d+) MB", log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16, help="experts of the generation MoE, half active (0: dense)")
    args = ap.parse_args()

    from unisparse import memplan
    from unisparse.families.mot import MoTFamily

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    spec = json.dumps({"steps": args.steps, "batch_gen": args.batch, "threads": 1, "seed": 0, "checkpoint_every": 1000})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # built in a child process: this one stays small (a child's ru_maxrss would inherit its peak)
        for name, sizes in (("model", (args.layers, args.hidden, args.width)), ("micro", (3, 64, 128))):
            code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import sharded_tuning as b; "
            code += f"b.build(b.Path({str(tmp / name)!r}), *{sizes!r}, {args.experts})"
            run([sys.executable, "-c", code], env)
        family = MoTFamily.load_empty(tmp / "model")
        tokens = family.config.num_latent_tokens + 16  # the shapes world's prompts: at most ~16 tokens
        sizes = memplan.sizes_from_family(family, "gen", "full", tokens=tokens)
        print(f"model: {sizes.total / 1e6:.0f} M parameters ({sizes.trainable / 1e6:.0f} M trained), "
              f"{args.layers} layers, hidden {args.hidden}, MLP {args.width}; "
              f"largest unit {sizes.largest_unit / 1e6:.1f} M")  # fmt: skip
        torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]

        def verb(model, out):
            return ["-m", "unisparse", "tune-moe", str(tmp / model), "--mode", "full", "--spec", spec,
                    "--device", "cpu", "--out", str(tmp / out)]  # fmt: skip

        one = run([sys.executable, *verb("model", "one")], env)
        two = run([*torchrun, *verb("model", "two")], env)
        overhead = {1: peaks(run([sys.executable, *verb("micro", "m1")], env))[0],
                    2: max(peaks(run([*torchrun, *verb("micro", "m2")], env)).values())}  # fmt: skip
        p1, p2 = peaks(one)[0], peaks(two)
        print(f"peak resident memory: one process {p1:.0f} MB; two processes {p2[0]:.0f} / {p2[1]:.0f} MB "
              f"(ratio {max(p2.values()) / p1:.2f})")  # fmt: skip
        a, b = weights(tmp / "two"), weights(tmp / "one")
        diff = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)
        beyond = sum(int(((a[k] - b[k]).abs() > 1e-5 * b[k].abs().max()).sum()) for k in b)
        share = beyond / sum(b[k].numel() for k in b)
        print(f"tuned weights, two processes vs one: largest relative difference {diff:.2e}; "
              f"{beyond} of {sum(b[k].numel() for k in b)} values ({share:.1e}) differ by more than 1e-5 x their "
              "tensor's largest")  # fmt: skip
        losses = [re.findall(r"step (\d+) loss (\S+)", log) for log in (one, two)]
        print(f"loss per logged step, one process: {losses[0]}; two: {sorted(set(losses[1]))}")
        for gpus, measured in ((1, p1), (2, max(p2.values()))):
            overhead_mb = overhead[gpus]
            memplan.OVERHEAD["cpu"] = int(overhead_mb * 2**20)
            planned = memplan.plan(sizes, gpus=gpus, batch=args.batch, dtype="float32", device="cpu")
            ratio = planned["total"] / 2**20 / measured
            print(
                f"plan, {gpus} process(es): {memplan.describe(planned, gpus)}; measured {measured / 1024:.2f} GB "
                f"(plan / measured {ratio:.2f}; overhead {overhead_mb:.0f} MB, the same run on a 3-layer model)"
            )
        (saved,) = re.findall(r"rank 0 wrote .* unit by unit: largest unit (\d+) MB, resident (\d+) MB before, "
                              r"at most (\d+) MB while saving", two)  # fmt: skip
        unit, before, peak = map(float, saved)
        print(f"save (rank 0): largest unit {unit:.0f} MB; resident {before:.0f} MB before, at most {peak:.0f} MB "
              f"while saving (+{peak - before:.0f} MB = {(peak - before) / unit:.2f} x the largest unit)")  # fmt: skip


if __name__ == "__main__":
    main()
