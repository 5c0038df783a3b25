"""The second family end to end through the CLI verbs the rules run: a tiny random Qwen-Image
pipeline (diffusers' test sizes, a locally made tokenizer, no network) is imported, calibrated on both
tasks, depth- and width-pruned on both components, partitioned into experts and tuned on the MMDiT, and
sampled by the evaluation, each result saved and reloaded by the next verb."""

import json

import pytest

pytest.importorskip("diffusers")

from helpers.cli import cli  # noqa: E402
from helpers.qwen_image import write_tiny_pipeline  # noqa: E402
from unisparse.families import load_family  # noqa: E402

CALIB = {
    "qa_items": 8,
    "samples_per_prompt": 1,
    "max_prompts_per_tag": 1,
    "num_steps": 2,
    "batch_size": 8,
    "threads": 1,
}
EVAL = {
    "qa_items": 8,
    "samples_per_prompt": 1,
    "max_prompts_per_tag": 1,
    "num_steps": 2,
    "batch_size": 8,
    "latency_repeats": 1,
    "threads": 1,
}
TUNE = {"steps": 2, "batch_gen": 2, "checkpoint_every": 1, "threads": 1}


def test_every_verb_runs_on_a_tiny_qwen_image_pipeline(tmp_path):
    raw = write_tiny_pipeline(tmp_path / "raw")
    dense = tmp_path / "dense"
    cli("import-qwen-image", "--src", raw, "--out", dense)
    ev = ["--eval-spec", json.dumps(EVAL)]
    for task in ("und", "gen"):
        cli("calibrate", dense, "--task", task, "--spec", json.dumps(CALIB), "--out", tmp_path / f"{task}.safetensors")
    cal = {"und": tmp_path / "und.safetensors", "gen": tmp_path / "gen.safetensors"}
    made = {}
    for component in ("und", "gen"):
        made[f"depth-{component}"] = (
            "prune-depth",
            dense,
            "--calibration",
            cal[component],
            "--component",
            component,
            "--granularity",
            "block",
            "--drop",
            "1",
        )
        made[f"width-{component}"] = (
            "prune-width",
            dense,
            "--calibration",
            cal[component],
            "--component",
            component,
            "--keep-ratio",
            "0.5",
        )
    made["moe"] = (
        "partition",
        dense,
        "--calibration",
        cal["gen"],
        "--component",
        "gen",
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--dense-layers",
        "none",
    )
    for name, argv in made.items():
        cli(*argv, "--out", tmp_path / name, "--metrics", tmp_path / f"{name}.json", *ev)
    cli(
        "tune-moe",
        tmp_path / "moe",
        "--mode",
        "frozen",
        "--spec",
        json.dumps(TUNE),
        "--summary",
        tmp_path / "frozen-summary.json",
        "--out",
        tmp_path / "frozen",
        "--metrics",
        tmp_path / "frozen.json",
        *ev,
    )
    cli("evaluate", dense, "--spec", json.dumps(EVAL), "--out", tmp_path / "dense.json")

    metrics = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in [*made, "frozen", "dense"]}
    for name, m in metrics.items():
        assert 0 <= m["generation"]["overall"] <= 1 and 0 <= m["understanding"]["overall"] <= 1, name
    total = {n: m["parameters"]["total"] for n, m in metrics.items()}
    for component in ("und", "gen"):
        assert total[f"depth-{component}"][component] < total["dense"][component]
        assert total[f"width-{component}"][component] < total["dense"][component]
        other = "gen" if component == "und" else "und"
        assert total[f"width-{component}"][other] == total["dense"][other]
    active = metrics["moe"]["parameters"]["active"]["gen"]
    assert active < total["moe"]["gen"] and metrics["moe"]["expert_load"]["num_experts"] == 4
    summary = json.loads((tmp_path / "frozen-summary.json").read_text())
    assert summary["trainable"] > 0 and len(summary["history"]) >= 1
    frozen = load_family(tmp_path / "frozen")
    assert frozen.moe_spec("gen")["top_k"] == 2 and not any(frozen.skipped("gen").values())
    assert (
        load_family(tmp_path / "depth-gen").skipped("gen")["attn"]
        == load_family(tmp_path / "depth-gen").skipped("gen")["mlp"]
    )
