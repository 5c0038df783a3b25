"""Nothing non-finite or mis-typed passes silently (issue 20, items 1, 2, 4, 10, 14, 15): training
stops on divergence and refuses float16, no model is saved with non-finite weights, impossible
calibration statistics are refused, a header declaring another dtype is refused naming the tensor,
killed writers' temporaries are discarded, and only verified files travel into derived models.

Settings (non-finite numbers, ranges) are in test_settings_numbers.py; the Hub cache in test_hub_cache.py.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.cli import refused
from helpers.models import MICRO_MODEL, make_model, save_calibration, save_dense
from unisparse import io as io_mod
from unisparse.calibrate import Calibration
from unisparse.io import (
    ALLOW_UNVERIFIED_ENV,
    MANIFEST,
    IntegrityError,
    NonFiniteError,
    directory_digest,
    save_model,
    sha256_file,
    write_manifest,
)
from unisparse.models.loading import load_model
from unisparse.text import tokenizer_files
from unisparse.train import train_tiny

STEPS = {"steps": 10, "batch_und": 4, "batch_gen": 4, "threads": 1}


# --- item 1: training cannot end in a NaN model with exit 0 ------------------------------------------


def test_float16_training_is_refused_before_work(tmp_path, capsys):
    refused(
        capsys,
        "train-tiny",
        "--model",
        json.dumps(MICRO_MODEL),
        "--train",
        json.dumps(STEPS),
        "--out",
        tmp_path / "m",
        "--dtype",
        "float16",
        naming="float16",
    )
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="float16 cannot train"):
        train_tiny(MICRO_MODEL, STEPS, tmp_path / "m", progress=False, dtype=torch.float16)


def test_divergent_training_stops_naming_the_step_and_saves_nothing(tmp_path, capsys):
    last = refused(
        capsys,
        "train-tiny",
        "--model",
        json.dumps(MICRO_MODEL),
        "--train",
        json.dumps({**STEPS, "lr": 1e30}),
        "--out",
        tmp_path / "m",
        naming="non-finite loss",
    )
    assert "at step" in last and "nothing was saved" in last
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))


def test_tuning_that_diverges_is_refused(tmp_path, capsys):
    from unisparse.moe.convert import convert_to_moe

    save_model(convert_to_moe(make_model(), "gen", 4, 2, dense_layers="none"), tmp_path / "moe")
    refused(
        capsys,
        "tune-moe",
        tmp_path / "moe",
        "--mode",
        "full",
        "--spec",
        json.dumps({"steps": 6, "batch_gen": 4, "threads": 1, "lr": 1e30}),
        "--out",
        tmp_path / "tuned",
        naming="non-finite",
    )
    assert not (tmp_path / "tuned").exists()
    refused(
        capsys,
        "tune-moe",
        tmp_path / "moe",
        "--mode",
        "full",
        "--spec",
        json.dumps({"steps": 6}),
        "--dtype",
        "float16",
        "--out",
        tmp_path / "tuned",
        naming="float16",
    )


def test_a_model_with_a_nan_weight_is_never_saved(tmp_path):
    model = make_model()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


# --- item 2: calibration statistics no calibration can produce ----------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    model = save_dense(root / "dense")
    save_calibration(model, root / "dense", root / "gen.safetensors")
    return root


def edited_calibration(root: Path, out: Path, key_suffix: str, edit) -> Path:
    """A copy of the calibration with one tensor edited and its sidecar's sha256 updated (so it
    passes the integrity check, as the probe's edits did)."""
    tensors = load_file(str(root / "gen.safetensors"))
    (key,) = [k for k in tensors if k.endswith(key_suffix)]
    tensors[key] = edit(tensors[key].clone())
    path = out / "edited.safetensors"
    save_file(tensors, str(path), metadata={"task": "gen"})
    sidecar = json.loads((root / "gen.safetensors.json").read_text())
    sidecar["sha256"] = sha256_file(path)
    Path(str(path) + ".json").write_text(json.dumps(sidecar))
    return path


def _set(index, value):
    def edit(t):
        t.view(-1)[index] = value
        return t

    return edit


def _negate(t):
    return -t.abs() - 1


@pytest.mark.parametrize(
    "suffix, edit, naming",
    [
        ("gen.gen.cos_block_bagel", _set(1, float("inf")), "infinite"),
        ("gen.gen.cos_block_bagel", _set(1, 7.0), "outside [-1, 1]"),
        ("gen.gen.cos_block_bagel", _set(1, float("nan")), "NaN cosines on layers that saw tokens"),
        ("gen.gen.cos_attn", _set(0, float("nan")), "NaN cosines on layers that saw tokens"),
    ],
)
def test_impossible_cosines_are_refused_by_prune_depth(calibrated, tmp_path, capsys, suffix, edit, naming):
    path = edited_calibration(calibrated, tmp_path, suffix, edit)
    refused(
        capsys,
        "prune-depth",
        calibrated / "dense",
        "--calibration",
        path,
        "--component",
        "gen",
        "--drop",
        "1",
        "--out",
        tmp_path / "pruned",
        naming=naming,
    )
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize(
    "edit, naming",
    [(_set(0, float("nan")), "non-finite mean"), (_set(0, float("inf")), "infinite"), (_negate, "negative value")],
)
@pytest.mark.parametrize(
    "verb",
    [
        ["prune-width", "--component", "gen", "--keep-ratio", "0.5"],
        ["prune-width", "--component", "gen", "--keep-ratio", "0.5", "--score", "published"],
        ["partition", "--component", "gen", "--num-experts", "4", "--top-k", "2", "--dense-layers", "none"],
    ],
)
def test_impossible_activation_means_are_refused(calibrated, tmp_path, capsys, edit, naming, verb):
    path = edited_calibration(calibrated, tmp_path, "gen.gen.act_abs_mean.1", edit)
    refused(
        capsys,
        verb[0],
        calibrated / "dense",
        "--calibration",
        path,
        *verb[1:],
        "--out",
        tmp_path / "out",
        naming=naming,
    )
    assert not (tmp_path / "out").exists()


def test_the_nan_a_calibration_writes_for_a_skipped_sublayer_is_accepted(calibrated, tmp_path):
    """The NaN ``tensors`` writes where no token passed is not damage: a real calibration loads."""
    from unisparse.families import load_family

    cal = Calibration.load(calibrated / "gen.safetensors")
    cal.check_applies_to(load_family(calibrated / "dense"), directory_digest(calibrated / "dense"))


# --- item 4 and 10: stored dtypes, damaged headers ------------------------------------------------------


def rewrite_header(path: Path, edit) -> None:
    """Edit a safetensors file's JSON header in place (tensor bytes unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_a_header_declaring_int32_at_the_same_byte_length_is_refused_naming_the_tensor(tmp_path, capsys):
    save_dense(tmp_path / "m")
    key = "language_model.model.embed_tokens.weight"

    def to_int32(header):
        assert header[key]["dtype"] == "F32"
        header[key]["dtype"] = "I32"

    rewrite_header(tmp_path / "m/model.safetensors", to_int32)
    write_manifest(tmp_path / "m")  # SHA256SUMS regenerated, as in the probe
    with pytest.raises(IntegrityError, match=rf"model.safetensors:{key} is I32 \(expected a floating dtype\)"):
        load_model(tmp_path / "m")
    for verb in (
        ["evaluate", "--spec", json.dumps({"qa_items": 4})],
        ["calibrate", "--task", "gen"],
        ["tune-moe", "--mode", "full"],
    ):
        refused(capsys, verb[0], tmp_path / "m", *verb[1:], "--out", tmp_path / "out", naming=f"{key} is I32")


@pytest.mark.parametrize("damage", ["shape", "dtype", "offsets"])
def test_a_damaged_header_is_one_line_naming_the_file(tmp_path, capsys, damage):
    save_dense(tmp_path / "m")
    key = "language_model.model.embed_tokens.weight"

    def edit(header):
        if damage == "shape":
            header[key]["shape"] = [-1, "x"]
        elif damage == "dtype":
            header[key]["dtype"] = "F33"
        else:
            header[key]["data_offsets"] = [0, 10**12]

    rewrite_header(tmp_path / "m/model.safetensors", edit)
    write_manifest(tmp_path / "m")
    refused(
        capsys,
        "evaluate",
        tmp_path / "m",
        "--spec",
        json.dumps({"qa_items": 4}),
        "--out",
        tmp_path / "e.json",
        naming="model.safetensors",
    )


# --- item 14: temporaries of killed writers -------------------------------------------------------------


def test_a_killed_save_leaves_a_temporary_the_next_save_discards(tmp_path):
    final = tmp_path / "m"
    script = (
        f"import os, signal; from unisparse.io import atomic_path\n"
        f"with atomic_path({str(final)!r}, is_dir=True) as tmp:\n"
        f"    (tmp / 'half').write_text('x'); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": "src"})
    assert proc.returncode == -signal.SIGKILL
    (leftover,) = tmp_path.glob(".m.tmp-*")
    save_dense(final)
    assert not leftover.exists() and not list(tmp_path.glob(".m.tmp-*"))
    assert load_model(final) is not None


def test_only_dead_or_stale_writers_temporaries_are_discarded(tmp_path):
    final = tmp_path / "m"
    host = io_mod._host()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    paths = {
        "live (this process)": (tmp_path / f".m.tmp-{host}-{os.getpid()}-abc", True),
        "dead writer": (tmp_path / f".m.tmp-{host}-{dead.pid}-abc", False),
        "old unnamed format": (tmp_path / ".m.tmp-k2j4h5g1", False),
        "other host, recent": (tmp_path / ".m.tmp-elsewhere-1-abc", True),
        "other host, stale": (tmp_path / ".m.tmp-faraway-1-abc", False),
        "another artifact's": (tmp_path / f".n.tmp-{host}-{dead.pid}-abc", True),
    }
    for path, _ in paths.values():
        path.mkdir()
    old = time.time() - io_mod.STALE_AFTER_S - 60
    os.utime(paths["other host, stale"][0], (old, old))
    io_mod.discard_leftovers(final)
    assert {what: path.exists() for what, (path, _) in paths.items()} == {
        what: kept for what, (_, kept) in paths.items()
    }


# --- item 15: only verified files travel; a missing manifest is refused --------------------------------


def test_an_unlisted_file_is_refused_and_never_carried_into_a_derived_model(tmp_path, capsys):
    save_dense(tmp_path / "m")
    (tmp_path / "m/merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(IntegrityError, match=r"merges.txt \(not in SHA256SUMS\)"):
        load_model(tmp_path / "m")
    assert tokenizer_files(tmp_path / "m") == []


def test_a_model_directory_without_its_manifest_is_refused_unless_the_user_opts_out(tmp_path, capsys, monkeypatch):
    save_dense(tmp_path / "m")
    (tmp_path / "m" / MANIFEST).unlink()
    weights = tmp_path / "m/model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # a flipped byte in the last tensor
    weights.write_bytes(bytes(raw))
    refused(
        capsys,
        "evaluate",
        tmp_path / "m",
        "--spec",
        json.dumps({"qa_items": 4}),
        "--out",
        tmp_path / "e.json",
        naming=f"has no {MANIFEST}",
    )
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    assert load_model(tmp_path / "m") is not None  # the user's explicit choice: loaded, unverified


def test_statistics_of_an_overflowing_model_are_not_written(tmp_path):
    from unisparse.calibrate import run_calibration, save_stats

    stats = run_calibration(
        make_model(), "gen", {"qa_items": 4, "samples_per_prompt": 1, "max_prompts_per_tag": 1, "num_steps": 2}
    )
    next(iter(stats.sums["gen"]["act_abs"].values()))[0] = float("inf")  # what an overflow leaves in the sums
    with pytest.raises(NonFiniteError, match="infinite value.*nothing was written"):
        save_stats(stats, "gen", tmp_path / "gen.safetensors")
    assert not (tmp_path / "gen.safetensors").exists()
