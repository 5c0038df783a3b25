"""Several processes (issue 9): train-tiny and tune-moe under `torchrun --nproc-per-node 2` on the CPU
(gloo, FSDP2) end where one process with the same global batch, seed and steps ends, and an
interrupted two-process run resumes to the same weights. The comparison is the largest relative
difference of any weight tensor, max|a - b| / max|b|."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.models import MICRO_MODEL, make_model
from unisparse.io import save_model
from unisparse.models.loading import load_model
from unisparse.moe.convert import convert_to_moe
from unisparse.moe.tune import tune_moe
from unisparse.train import train_tiny

BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"
TUNE = {"steps": 6, "batch_gen": 4, "checkpoint_every": 2, "threads": 1, "seed": 3}
TRAIN = {"steps": 5, "batch_und": 4, "batch_gen": 4, "threads": 1}

pytestmark = [
    pytest.mark.slow,  # torchrun subprocesses: outside the fast inner loop
    pytest.mark.skipif(
        not (TORCHRUN.exists() and torch.distributed.is_available()), reason="needs torch.distributed and torchrun"
    ),
]


def torchrun(*argv, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(model_dir) -> dict:
    """Every tensor of a model directory, whether in one file or in the sharded layout."""
    found = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        found.update(load_file(str(path)))
    return found


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp(min=1e-12)) for k in a)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    save_model(convert_to_moe(make_model(), "gen", 4, 2, dense_layers="none"), root / "moe")
    return root / "moe"


def single_process_tuning(moe_dir, mode="full"):
    model = load_model(moe_dir)
    summary = tune_moe(model, "gen", mode, TUNE, progress=False)
    return model.state_dict(), summary


def test_two_process_tuning_equals_one_process(moe_dir, tmp_path):
    want, summary = single_process_tuning(moe_dir)
    torchrun(
        "-m",
        "unisparse",
        "--no-progress",
        "tune-moe",
        moe_dir,
        "--mode",
        "full",
        "--spec",
        json.dumps(TUNE),
        "--summary",
        tmp_path / "summary.json",
        "--out",
        tmp_path / "out",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    got = weights(tmp_path / "out")
    assert max_relative_difference(got, want) < 1e-4
    two = json.loads((tmp_path / "summary.json").read_text())
    assert two["processes"] == 2
    assert [h["step"] for h in two["history"]] == [h["step"] for h in summary["history"]]
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(two["history"], summary["history"]))


@pytest.mark.parametrize("objective", ["flow", "distill"])
def test_two_process_tuning_on_prepared_latents_equals_one_process(moe_dir, tmp_path, objective):
    """Each process reads its slice of the same global batch of prepared latents (``tune-moe --data``);
    with ``distill``, each compares with the same (unsharded) teacher."""
    from helpers.cli import cli
    from helpers.tune_data import SHAPES_CAPTIONS, prepare_argv, write_tar
    from unisparse.families import load_family
    from unisparse.tunedata.latents import LatentSet

    write_tar(tmp_path / "raw" / "a.tar", SHAPES_CAPTIONS)
    cli(*prepare_argv(moe_dir, tmp_path / "raw", {"source": "webdataset", "shard_size": 3}, tmp_path / "data"))
    save_model(make_model(), tmp_path / "dense")  # the MoE's dense parent (moe_dir's source)
    spec = {**TUNE, "objective": objective}
    teacher = {"teacher": load_family(tmp_path / "dense")} if objective == "distill" else {}
    model = load_model(moe_dir)
    summary = tune_moe(model, "gen", "full", spec, progress=False, data=LatentSet(tmp_path / "data"), **teacher)
    extra = ["--teacher", tmp_path / "dense"] if teacher else []
    torchrun("-m", "unisparse", "--no-progress", "tune-moe", moe_dir, "--mode", "full", "--spec", json.dumps(spec),
             "--data", tmp_path / "data", "--summary", tmp_path / "summary.json", "--out", tmp_path / "out",
             "--device", "cpu", *extra, cwd=tmp_path)  # fmt: skip
    got = weights(tmp_path / "out")
    assert max_relative_difference(got, model.state_dict()) < 1e-4
    two = json.loads((tmp_path / "summary.json").read_text())
    assert two["processes"] == 2 and two["data"] == summary["data"]
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(two["history"], summary["history"]))


STOP = """import json, sys
from unisparse.models.loading import load_model
from unisparse.moe.tune import tune_moe
tune_moe(load_model(sys.argv[1]), "gen", "full", json.loads(sys.argv[2]), checkpoint_dir=sys.argv[3], progress=False,
         stop_after=int(sys.argv[4]))
"""


def test_interrupted_two_process_tuning_resumes_to_the_same_weights(moe_dir, tmp_path):
    (tmp_path / "stop.py").write_text(STOP)
    torchrun(
        "-m",
        "unisparse",
        "--no-progress",
        "tune-moe",
        moe_dir,
        "--mode",
        "full",
        "--spec",
        json.dumps(TUNE),
        "--out",
        tmp_path / "straight",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    torchrun(tmp_path / "stop.py", moe_dir, json.dumps(TUNE), tmp_path / "ck", 3, cwd=tmp_path)
    meta = json.loads((tmp_path / "ck/last/meta.json").read_text())
    assert meta["step"] == 2  # the checkpoint before the interruption at step 3
    proc = torchrun(
        "-m",
        "unisparse",
        "--no-progress",
        "tune-moe",
        moe_dir,
        "--mode",
        "full",
        "--spec",
        json.dumps(TUNE),
        "--checkpoint-dir",
        tmp_path / "ck",
        "--out",
        tmp_path / "resumed",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert "resuming full tuning from step 2" in proc.stderr
    straight = weights(tmp_path / "straight")
    resumed = weights(tmp_path / "resumed")
    assert max_relative_difference(resumed, straight) < 1e-6
    assert not (tmp_path / "ck").exists(), "a finished run leaves no checkpoint"


def test_two_process_training_equals_one_process(tmp_path):
    train_tiny(MICRO_MODEL, TRAIN, tmp_path / "one", progress=False)
    torchrun(
        "-m",
        "unisparse",
        "--no-progress",
        "train-tiny",
        "--model",
        json.dumps(MICRO_MODEL),
        "--train",
        json.dumps(TRAIN),
        "--out",
        tmp_path / "two",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    assert max_relative_difference(two, one) < 1e-4
    assert json.loads((tmp_path / "two/config.json").read_text())["num_hidden_layers"] == 2


def test_global_batch_must_split_evenly(moe_dir, tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "unisparse",
            "--no-progress",
            "tune-moe",
            str(moe_dir),
            "--mode",
            "frozen",
            "--spec",
            json.dumps({**TUNE, "batch_gen": 3}),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "not divisible by the 2 processes" in proc.stderr
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
