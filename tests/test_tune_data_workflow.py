"""The tuning-data stage through Snakemake on both real families at toy scale: a BAGEL-layout
checkpoint (``models.bagel.write_fake_checkpoint``, imported strictly) and a tiny Qwen-Image
pipeline, each with a tiny WebDataset tar and a tiny BAGEL T2I parquet. Snakemake prepares the data,
then runs the MoE's expert-frozen and full tuning and both tuned controls (dense and the static width cut) on it,
each job evaluating its model; the real benchmarks of the BAGEL run read tiny detector, CLIP and MME
models from a temporary Hugging Face cache, offline."""

import json

import pytest
import yaml

from helpers.benchmarks import (  # noqa: F401  (the revisions the evaluator pins)
    CLIP_COMMIT,
    COMMIT_MME,
    DETECTOR_COMMIT,
    cache_repo,
    mme_files,
    mme_rows,
    tiny_clip,
    tiny_detector,
    write_dataset,
)
from helpers.cli import cli
from helpers.tune_data import CAPTIONS, SHAPES_CAPTIONS, write_parquet, write_tar
from helpers.workflow import copy_workflow, failed_job_logs, planned_jobs, snakemake

pytestmark = pytest.mark.slow  # drives Snakemake in subprocesses: outside the fast inner loop

MOE = "results/metrics/moe/gen/E4-k2-snake-paper-s0"
STATIC = "width/gen/cal-gen/act_norm/keep0.5"
TARGETS = [
    f"{MOE}/frozen.json",
    f"{MOE}/full.json",
    "results/metrics/tuned/dense.json",
    f"results/metrics/tuned/{STATIC}.json",
]
ALLOWED = ["prepare_tune_data", "calibrate", "partition", "tune_moe", "prune_width", "tune_control"]
TUNE = {"steps": 2, "batch_gen": 2, "checkpoint_every": 1, "threads": 1}


def study(model: dict, evaluate: dict, calibrate: dict, data: dict, checkpoint: dict) -> dict:
    return {
        "results_dir": "results",
        "logs_dir": "logs",
        "runtime": {"device": "cpu", "dtype": "float32"},
        "checkpoint": checkpoint,
        "model": model,
        "evaluate": evaluate,
        "calibrate": calibrate,
        "depth": {
            "sweeps": [
                {
                    "component": "gen",
                    "calib_task": "gen",
                    "granularity": "block",
                    "score": "ld",
                    "kv": "keep",
                    "mode": "oneshot",
                    "drop": [1],
                }
            ]
        },  # fmt: skip
        "width": {
            "seed": 0,
            "sweeps": [{"component": "gen", "calib_task": "gen", "score": "act_norm", "keep_ratio": [0.5]}],
        },
        "moe": {
            "component": "gen",
            "calib_task": "gen",
            "dense_layers": "none",
            "seed": 0,
            "partitions": [{"num_experts": 4, "top_k": 2, "method": "snake", "router": "paper"}],
            "tunings": ["none", "frozen", "full"],
            "full_init": "frozen",
            "controls": ["dense", "static"],
            "tune": {"data": data, "frozen": TUNE, "full": {**TUNE, "objective": "distill"}},
        },
        "resources": {"default": {"threads": 1, "mem_mb": 1000, "runtime": 10, "gpus": 0}},
    }


def run_study(workdir, config: dict):
    (workdir / "study.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(workdir, "-n", "--allowed-rules", *ALLOWED, targets=TARGETS, config="study.yaml")
    jobs = planned_jobs(dry)
    proc = snakemake(
        workdir, "--cores", "1", "--allowed-rules", *ALLOWED, targets=TARGETS, config="study.yaml", check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + failed_job_logs(workdir, proc.stderr)
    return jobs


def check_tuned(workdir, jobs, source):
    """One prepare job, then both MoE tunings and both controls, each on the prepared set."""
    assert jobs["prepare_tune_data"] == 1 and jobs["tune_moe"] == 2 and jobs["tune_control"] == 2, jobs
    manifest = json.loads((workdir / "results/tunedata" / source / "manifest.json").read_text())
    for name in [f"moe/gen/E4-k2-snake-paper-s0/{m}" for m in ("frozen", "full")] + ["tuned/dense", f"tuned/{STATIC}"]:
        summary = json.loads((workdir / "results/tuning" / f"{name}.json").read_text())
        assert summary["data"]["examples"] == manifest["count"] == 6, name
        assert summary["tune"]["objective"] == ("flow" if name.endswith("frozen") else "distill")
        assert (workdir / "results/models" / name).is_dir() and (workdir / "results/metrics" / f"{name}.json").is_file()


def raw_data(root, source: str, captions, size) -> dict:
    """A tiny raw set of ``source`` in its real layout under ``root``; its ``moe.tune.data`` section."""
    if source == "webdataset":
        write_tar(root / "part-0.tar", captions, size=size)
    else:
        write_parquet(root / "t2i-0.parquet", captions, size=size, variants={"same": lambda c: c})
    return {"source": source, "path": str(root), "shard_size": 4, "batch_size": 4}


SOURCES = ["webdataset", "bagel_parquet"]


@pytest.mark.parametrize("source", SOURCES)
def test_bagel_layout_tunes_on_prepared_data_through_snakemake(tmp_path, monkeypatch, source):
    from unisparse.evaluate import geneval as g
    from unisparse.models.bagel import FAKE_SIZES, write_fake_checkpoint

    hub = tmp_path / "hf"
    tiny_detector(tmp_path / "saved-detector", "cat")
    tiny_clip(tmp_path / "saved-clip")
    cache_repo(hub, g.DEFAULT_DETECTOR, DETECTOR_COMMIT, tmp_path / "saved-detector")
    cache_repo(hub, g.DEFAULT_CLIP, CLIP_COMMIT, tmp_path / "saved-clip")
    write_dataset(hub, "lmms-lab/MME", COMMIT_MME, mme_files(mme_rows()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))

    workdir = copy_workflow(tmp_path / "wf")
    write_fake_checkpoint(tmp_path / "src", sizes={"image_size": 32})
    cli("import-bagel", "--src", tmp_path / "src", "--out", workdir / "results/models/dense", "--dtype", "float32",
        "--image-size", "32", "--vit-image-size", "28")  # fmt: skip
    sizes = {k: FAKE_SIZES[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    model = {**sizes, "num_attention_heads": FAKE_SIZES["num_attention_heads"],
             "num_key_value_heads": FAKE_SIZES["num_key_value_heads"]}  # fmt: skip
    real = {"benchmarks": {"gen": "geneval", "und": "mme"}, "samples_per_prompt": 1, "max_prompts_per_tag": 1,
            "num_steps": 2, "cfg_scale": 4.0, "batch_size": 4, "threads": 1}  # fmt: skip
    config = study(
        model,
        {**real, "geneval_prompts": "short", "mme_max_images_per_subtask": 1, "latency_repeats": 1},
        real,
        raw_data(tmp_path / "raw", source, CAPTIONS[:6], (48, 40)),
        {"source": "huggingface", "lock": "data/bagel-7b-mot.lock.json"},
    )
    jobs = run_study(workdir, config)
    check_tuned(workdir, jobs, source)


@pytest.mark.parametrize("source", SOURCES)
def test_qwen_image_tunes_on_prepared_data_through_snakemake(tmp_path, source):
    pytest.importorskip("diffusers")
    from helpers.qwen_image import write_tiny_pipeline
    from unisparse.families import load_family

    workdir = copy_workflow(tmp_path / "wf")
    write_tiny_pipeline(tmp_path / "pipeline")
    dense = workdir / "results/models/dense"
    cli("import-qwen-image", "--src", tmp_path / "pipeline", "--out", dense)
    family = load_family(dense)
    H, W = family.training_size
    layers = {c: family.num_layers(c) for c in family.components}
    widths = {c: family.mlp_weights(c, 0).width for c in family.components}
    shapes = {"samples_per_prompt": 1, "max_prompts_per_tag": 1, "num_steps": 2, "batch_size": 8, "threads": 1,
              "qa_items": 8}  # fmt: skip
    config = study(
        {"family": "qwen_image", "layers": layers, "mlp_width": widths},
        {**shapes, "latency_repeats": 1},
        shapes,
        raw_data(tmp_path / "raw", source, SHAPES_CAPTIONS[:6], (W + 8, H)),
        {"source": "huggingface", "lock": "data/qwen-image.lock.json"},
    )
    jobs = run_study(workdir, config)
    check_tuned(workdir, jobs, source)
