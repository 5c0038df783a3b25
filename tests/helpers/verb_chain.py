"""Every CLI verb of the pipeline on one micro checkpoint, on a given device and dtype (shared by
test_dtype_device.py on the CPU and test_cuda.py on a GPU)."""

import json
from pathlib import Path

from helpers.cli import cli
from helpers.models import MICRO_MODEL

#: enough training that the scores are not all zero, so a dtype or device change could move them
TRAIN = {"steps": 300, "batch_und": 16, "batch_gen": 16, "threads": 2}
EVAL = {
    "qa_items": 256,
    "samples_per_prompt": 2,
    "max_prompts_per_tag": 16,
    "num_steps": 8,
    "latency_repeats": 1,
    "threads": 2,
}
CALIB = {"qa_items": 32, "samples_per_prompt": 1, "max_prompts_per_tag": 2, "num_steps": 4, "threads": 2}
TUNE = {"steps": 6, "batch_gen": 4, "checkpoint_every": 3, "threads": 2}
SCORES = ("understanding", "generation")


def train_checkpoint(root: Path) -> Path:
    """A micro model trained on the CPU in float32 (the checkpoint every device and dtype starts from)."""
    cli(
        "train-tiny",
        "--model",
        json.dumps(MICRO_MODEL),
        "--train",
        json.dumps(TRAIN),
        "--out",
        root / "dense",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    )
    cli(
        "calibrate",
        root / "dense",
        "--task",
        "gen",
        "--spec",
        json.dumps(CALIB),
        "--out",
        root / "gen.safetensors",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    )
    return root


def run_chain(root: Path, out: Path, device: str, dtype: str) -> dict:
    """calibrate, prune-depth, prune-width, partition, tune-moe (frozen, full) and evaluate on
    ``device`` in ``dtype``; returns {variant: metrics}. float16 cannot train (AdamW underflows):
    there tune-moe must be refused with exit 2, and the tuned variants are absent."""
    run = ["--device", device, "--dtype", dtype]
    ev = ["--eval-spec", json.dumps(EVAL)]
    dense, cal = root / "dense", root / "gen.safetensors"
    cli("calibrate", dense, "--task", "gen", "--spec", json.dumps(CALIB), "--out", out / "gen.safetensors", *run)
    cli("evaluate", dense, "--spec", json.dumps(EVAL), "--out", out / "dense.json", *run)
    cli(
        "prune-depth",
        dense,
        "--calibration",
        cal,
        "--component",
        "und",
        "--drop",
        "1",
        "--out",
        out / "depth",
        "--metrics",
        out / "depth.json",
        *ev,
        *run,
    )
    cli(
        "prune-width",
        dense,
        "--calibration",
        cal,
        "--component",
        "gen",
        "--keep-ratio",
        "0.5",
        "--out",
        out / "width",
        "--metrics",
        out / "width.json",
        *ev,
        *run,
    )
    cli(
        "partition",
        dense,
        "--calibration",
        cal,
        "--component",
        "gen",
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--dense-layers",
        "none",
        "--out",
        out / "moe",
        "--metrics",
        out / "moe.json",
        *ev,
        *run,
    )
    for mode, source in (("frozen", "moe"), ("full", "frozen")):
        tune = (
            "tune-moe",
            out / source,
            "--mode",
            mode,
            "--spec",
            json.dumps(TUNE),
            "--checkpoint-dir",
            out / f"ck-{mode}",
            "--summary",
            out / f"{mode}-summary.json",
            "--out",
            out / mode,
            "--metrics",
            out / f"{mode}.json",
            *ev,
            *run,
        )
        if dtype == "float16":
            try:
                cli(*tune)
                raise AssertionError("tune-moe trained in float16")
            except SystemExit as e:
                assert e.code == 2, e.code
            assert not (out / mode).exists()
            break
        cli(*tune)
    names = ("dense", "depth", "width", "moe") + (() if dtype == "float16" else ("frozen", "full"))
    return {name: json.loads((out / f"{name}.json").read_text()) for name in names}


def score_differences(a: dict, b: dict) -> dict:
    """|a - b| of both overall scores, per variant the two runs share."""
    return {(name, s): abs(a[name][s]["overall"] - b[name][s]["overall"]) for name in a if name in b for s in SCORES}
