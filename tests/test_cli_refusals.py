"""The CLI refuses before any work, with one line and exit status 2 (issue 20, items 1, 8-11):
float16 training, settings out of range or non-finite, duplicate keys, OS errors (a full disk, a
file too large, a symlink loop), a metrics file that is not one, and a local verb that would ask
the Hub.
"""

import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest

from helpers.cli import refused, run_cli
from helpers.models import make_model
from unisparse import cli
from unisparse.io import save_model


@pytest.fixture
def model_dir(tmp_path):
    save_model(make_model(), tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading, building or evaluating a model fails the test: refusals must come first."""
    import unisparse.evaluate
    import unisparse.train

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(cli, "_load", loaded)
    monkeypatch.setattr(unisparse.train, "train_tiny", loaded)
    monkeypatch.setattr(unisparse.evaluate, "evaluate_model_dir", loaded)


# --- item 1: float16 cannot train ------------------------------------------------------------------


def test_train_tiny_refuses_float16_before_building_a_model(capsys, tmp_path, nothing_loads):
    line = refused(
        capsys,
        "train-tiny",
        "--dtype",
        "float16",
        "--train",
        '{"steps": 2}',
        "--out",
        tmp_path / "out",
        naming="float16",
    )
    assert "bfloat16" in line and "float32" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["tune-moe", "tune"])
def test_tuning_refuses_float16_before_loading_the_model(capsys, tmp_path, model_dir, nothing_loads, verb):
    refused(
        capsys, verb, model_dir, "--mode", "full", "--dtype", "float16", "--out", tmp_path / "out", naming="float16"
    )
    assert not (tmp_path / "out").exists()


# --- item 9 (and 3): the verbs' settings, checked as the schema checks the config ----------------------


CASES = {
    "train-tiny steps -3": (["train-tiny", "--train", '{"steps": -3}'], "steps=-3: must be >= 1"),
    "train-tiny lr inf": (["train-tiny", "--train", '{"lr": Infinity}'], "lr=inf"),
    "train-tiny model shift inf": (["train-tiny", "--model", '{"timestep_shift": Infinity}'], "timestep_shift=inf"),
    "evaluate num_steps 0": (["evaluate", "{model}", "--spec", '{"num_steps": 0}'], "num_steps=0"),
    "evaluate cfg_scale inf": (["evaluate", "{model}", "--spec", '{"cfg_scale": Infinity}'], "cfg_scale=inf"),
    "evaluate cfg_interval nan": (
        ["evaluate", "{model}", "--spec", '{"cfg_interval": [0.0, NaN]}'],
        "cfg_interval[1]=nan",
    ),
    "evaluate max_prompts_per_tag 0": (
        ["evaluate", "{model}", "--spec", '{"max_prompts_per_tag": 0}'],
        "max_prompts_per_tag=0",
    ),
    "evaluate samples_per_prompt 0": (
        ["evaluate", "{model}", "--spec", '{"samples_per_prompt": 0}'],
        "samples_per_prompt=0",
    ),
    "evaluate batch_size 0": (["evaluate", "{model}", "--spec", '{"batch_size": 0}'], "batch_size=0"),
    "evaluate latency_repeats 0": (["evaluate", "{model}", "--spec", '{"latency_repeats": 0}'], "latency_repeats=0"),
    "evaluate qa_items 0": (["evaluate", "{model}", "--spec", '{"qa_items": 0}'], "qa_items=0"),
    "evaluate qa_items 10**12": (["evaluate", "{model}", "--spec", '{"qa_items": 1000000000000}'], "<= 1000000"),
    "calibrate qa_items 0": (["calibrate", "{model}", "--task", "und", "--spec", '{"qa_items": 0}'], "qa_items=0"),
    "calibrate calib_items 0": (
        ["calibrate", "{model}", "--task", "und", "--spec", '{"calib_items": 0}'],
        "calib_items=0",
    ),
    "calibrate max_prompts_per_tag 0": (
        ["calibrate", "{model}", "--task", "gen", "--spec", '{"max_prompts_per_tag": 0}'],
        "max_prompts_per_tag=0",
    ),
    "tune-moe warmup_frac -5": (
        ["tune-moe", "{model}", "--mode", "full", "--spec", '{"warmup_frac": -5}'],
        "warmup_frac=-5",
    ),
    "tune-moe min_lr_frac 7": (
        ["tune-moe", "{model}", "--mode", "full", "--spec", '{"min_lr_frac": 7}'],
        "min_lr_frac=7",
    ),
    "tune-moe lr Infinity": (["tune-moe", "{model}", "--mode", "full", "--spec", '{"lr": Infinity}'], "lr=inf"),
    "prune-width eval qa_items 0": (
        [
            "prune-width",
            "{model}",
            "--component",
            "gen",
            "--keep-ratio",
            "0.5",
            "--score",
            "random",
            "--metrics",
            "{tmp}/m.json",
            "--eval-spec",
            '{"qa_items": 0}',
        ],
        "qa_items=0",
    ),
    "duplicate JSON key": (["train-tiny", "--train", '{"steps": 40, "steps": 4000}'], "steps: duplicate key"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_settings_that_cannot_work_are_refused_before_loading(capsys, tmp_path, model_dir, nothing_loads, case):
    argv, naming = CASES[case]
    argv = [a.replace("{model}", str(model_dir)).replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / ("out.json" if argv[0] == "evaluate" else "out.safetensors" if argv[0] == "calibrate" else "out")
    refused(capsys, *argv, "--out", out, naming=naming)
    assert not out.exists()


def test_a_duplicate_key_in_a_settings_file_is_refused_naming_it(capsys, tmp_path, nothing_loads):
    spec = tmp_path / "train.yaml"
    spec.write_text("steps: 40\nlr: 0.001\nsteps: 4000\n")
    line = refused(
        capsys, "train-tiny", "--train", f"@{spec}", "--out", tmp_path / "out", naming="steps: duplicate key"
    )
    assert str(spec) in line and "line 3" in line


# --- item 10: OS errors and files that are not metrics --------------------------------------------------


METRICS = {
    "understanding": {"overall": 0.5, **{f"m{i}": 0.5 for i in range(100)}},
    "generation": {"overall": 0.25},
    "parameters": {"total": {"und": 10}, "active": {"und": 10}},
    "flops_per_token": {"und": 20},
    "latency": {"gen_seconds_per_image": 1.0, "und_seconds_per_item": 0.1},
}


def test_aggregate_refuses_an_empty_metrics_file(capsys, tmp_path):
    (tmp_path / "m.json").write_text("{}")
    line = refused(
        capsys, "aggregate", tmp_path / "m.json", "--out", tmp_path / "t.csv", naming=str(tmp_path / "m.json")
    )
    assert "not a metrics file" in line
    assert not (tmp_path / "t.csv").exists()


def test_aggregate_refuses_a_symlink_loop(capsys, tmp_path):
    os.symlink(tmp_path / "b.json", tmp_path / "a.json")
    os.symlink(tmp_path / "a.json", tmp_path / "b.json")
    line = refused(
        capsys, "aggregate", tmp_path / "a.json", "--out", tmp_path / "t.csv", naming=str(tmp_path / "a.json")
    )
    assert os.strerror(errno.ELOOP) in line


def test_a_full_disk_during_a_save_is_one_line(capsys, tmp_path, monkeypatch):
    """ENOSPC from a write names no file: the line names what the verb writes; nothing is left behind."""
    import pandas as pd

    (tmp_path / "m.json").write_text(json.dumps(METRICS))

    def full(self, path, **kwargs):
        with open(path, "w") as f:
            f.write("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    line = refused(
        capsys, "aggregate", tmp_path / "m.json", "--out", tmp_path / "t.csv", naming="No space left on device"
    )
    assert str(tmp_path / "t.csv") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # atomic: no partial file


def test_a_file_too_large_is_one_line(tmp_path):
    """A real EFBIG: the CSV outgrows the process's file-size limit (SIGXFSZ ignored, so write fails)."""
    (tmp_path / "m.json").write_text(json.dumps(METRICS))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unisparse",
            "--no-progress",
            "aggregate",
            str(tmp_path / "m.json"),
            "--out",
            str(tmp_path / "t.csv"),
        ],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert os.strerror(errno.EFBIG) in lines[0] and str(tmp_path / "t.csv") in lines[0]
    assert not (tmp_path / "t.csv").exists()


# --- item 11: a local verb never asks the Hub -------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt is recorded (and fails): a local verb must make none."""
    attempts = []

    def connect(self, address, *a, **k):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, "network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(None, address))
    return attempts


@pytest.mark.parametrize("argv", [["does/not/exist"], ["--bagel", "does/not/exist"], ["org/model"]])
def test_count_params_on_a_missing_path_asks_no_server(capsys, tmp_path, monkeypatch, no_network, argv):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "count-params", *argv, naming=argv[-1])
    assert "no such model directory" in line
    assert no_network == []


def test_count_params_on_a_model_directory_still_counts(capsys, model_dir, no_network):
    assert run_cli("count-params", model_dir) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["total"] == sum(p.numel() for p in make_model().parameters())
    assert no_network == []


def test_a_model_save_that_outgrows_the_disk_is_one_line(tmp_path, model_dir):
    """safetensors reports a failed write as its own error, not an OSError: still one line, exit 2."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "cut"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unisparse",
            "--no-progress",
            "prune-width",
            str(model_dir),
            "--component",
            "gen",
            "--keep-ratio",
            "0.5",
            "--score",
            "random",
            "--out",
            str(out),
        ],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        check=False,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "File too large" in last and str(out) in last, last
    assert not out.exists()
