"""Mistaken and hostile inputs to the library and the CLI (issue 8): every bad value refused before
any work with one line naming it; corrupted or mismatched artifacts detected, naming the file;
checkpoints resumed only from the same input; artifacts readable by the user's group.

Pipeline-level cases (config validation, shell injection) live in test_workflow.py, the
kill-change-rerun scenario in test_checkpoint_provenance.py, DVC cases in test_dvc_integrity.py.
"""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from helpers.cli import refused, run_cli
from helpers.models import make_model, save_calibration, save_dense
from unisparse.calibrate import Calibration
from unisparse.io import ALLOW_UNVERIFIED_ENV, MANIFEST, IntegrityError, save_model
from unisparse.models.loading import load_model
from unisparse.moe.convert import convert_to_moe
from unisparse.moe.tune import tune_moe

EVAL = json.dumps(
    {"qa_items": 8, "samples_per_prompt": 1, "max_prompts_per_tag": 1, "num_steps": 2, "latency_repeats": 1}
)
TUNE = {"steps": 6, "batch_gen": 4, "checkpoint_every": 2, "threads": 1}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two different dense models (3 and 2 layers), each with its generation calibration."""
    root = tmp_path_factory.mktemp("artifacts")
    a = save_dense(root / "a")
    save_calibration(a, root / "a", root / "a.safetensors")
    b = save_dense(root / "b", seed=1, num_hidden_layers=2)
    save_calibration(b, root / "b", root / "b.safetensors")
    c = save_dense(root / "c", seed=2)  # same shapes as a, other weights
    save_calibration(c, root / "c", root / "c.safetensors")
    return root


# --- item 5: strict loading, calibrations of other models, layers that do not exist ------------------


def test_config_disagreeing_with_weights_is_refused_listing_keys(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")  # a hand-edited model has no valid manifest: the user opts out
    save_dense(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    for layers, what in ((4, "missing"), (2, "unexpected")):
        config["num_hidden_layers"] = layers
        (tmp_path / "m/config.json").write_text(json.dumps(config))
        (tmp_path / "m" / MANIFEST).unlink(missing_ok=True)  # a hand-edited model has no valid manifest
        with pytest.raises(IntegrityError, match=rf"{what} tensor\(s\): language_model\.model\.layers\.(3|2)\."):
            load_model(tmp_path / "m")


def test_mis_shaped_tensor_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    save_dense(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    config["intermediate_size"] = 32
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    (tmp_path / "m" / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=r"mis-shaped tensor\(s\): .*mlp.*\[64, 32\] \(config wants \[32, 32\]\)"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize(
    "verb",
    [
        ["prune-depth", "--component", "und", "--drop", "1"],
        ["prune-width", "--component", "gen", "--keep-ratio", "0.5", "--score", "published"],
        ["prune-width", "--component", "gen", "--keep-ratio", "0.5", "--score", "act_norm"],
        ["partition", "--component", "gen", "--num-experts", "4", "--top-k", "2", "--dense-layers", "none"],
    ],
)
@pytest.mark.parametrize("other", ["b", "c"])
def test_calibration_of_another_model_is_refused(artifacts, tmp_path, capsys, verb, other):
    """b: another layer count (structure check); c: same shapes, other weights (provenance hash)."""
    name, *rest = verb
    refused(
        capsys,
        name,
        artifacts / "a",
        "--calibration",
        artifacts / f"{other}.safetensors",
        *rest,
        "--out",
        tmp_path / "out",
        naming="another model" if other == "c" else "layers",
    )
    assert not (tmp_path / "out").exists()


def test_partition_dense_layer_beyond_the_model_is_refused(artifacts, tmp_path, capsys):
    refused(
        capsys,
        "partition",
        artifacts / "a",
        "--calibration",
        artifacts / "a.safetensors",
        "--component",
        "gen",
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--dense-layers",
        "5",
        "--out",
        tmp_path / "out",
        naming="--dense-layers",
    )
    assert not (tmp_path / "out").exists()


# --- item 6: every argument checked before the work -------------------------------------------------


#: a data-free width cut, the verb the evaluation and meta options are tried on
WIDTH_CUT = ["prune-width", "{a}", "--component", "gen", "--keep-ratio", "0.5", "--score", "weight"]
BAD_ARGS = {
    "eval-spec unknown key": ([*WIDTH_CUT, "--metrics", "{m}", "--eval-spec", '{{"qa_itemz": 1}}'], "qa_itemz"),
    "eval-spec wrong type": ([*WIDTH_CUT, "--metrics", "{m}", "--eval-spec", '{{"num_steps": "many"}}'], "num_steps"),
    "eval-spec not a mapping": ([*WIDTH_CUT, "--metrics", "{m}", "--eval-spec", "[1, 2]"], "--eval-spec"),
    "eval-spec unparsable": ([*WIDTH_CUT, "--metrics", "{m}", "--eval-spec", '{{"a": [}}'], "--eval-spec"),
    "eval-spec missing file": ([*WIDTH_CUT, "--metrics", "{m}", "--eval-spec", "@/nonexistent.yaml"], "--eval-spec"),
    "meta not a mapping": ([*WIDTH_CUT, "--metrics", "{m}", "--meta", "3"], "--meta"),
    "eval-spec without metrics": ([*WIDTH_CUT, "--eval-spec", "{{}}"], "--metrics"),
    "act_norm without calibration": (
        ["prune-width", "{a}", "--component", "gen", "--keep-ratio", "0.5"],
        "--calibration",
    ),
    "drop beyond the layers": (
        ["prune-depth", "{a}", "--calibration", "{cal}", "--component", "und", "--drop", "5"],
        "--drop",
    ),
    "calib-spec unknown key": (
        [
            "prune-depth",
            "{a}",
            "--calibration",
            "{cal}",
            "--component",
            "und",
            "--drop",
            "1",
            "--calib-spec",
            '{{"bogus": 1}}',
        ],
        "bogus",
    ),
    "missing calibration file": (
        ["prune-depth", "{a}", "--calibration", "/nonexistent.safetensors", "--component", "und", "--drop", "1"],
        "nonexistent",
    ),
    "missing model": (
        ["prune-width", "/nonexistent", "--component", "gen", "--keep-ratio", "0.5", "--score", "weight"],
        "/nonexistent",
    ),
    "shared expert as wide as the MLP": (
        [
            "partition",
            "{a}",
            "--component",
            "gen",
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--shared-size",
            "64",
            "--dense-layers",
            "none",
        ],
        "shared_size",
    ),
    "experts not dividing the width": (
        ["partition", "{a}", "--component", "gen", "--num-experts", "5", "--top-k", "2", "--dense-layers", "none"],
        "num_experts",
    ),
    "cluster without calibration": (
        ["partition", "{a}", "--component", "gen", "--num-experts", "4", "--top-k", "2", "--method", "cluster"],
        "--calibration",
    ),
    "router-tune a dense model": (
        ["tune-moe", "{a}", "--mode", "frozen", "--spec", '{{"steps": 2}}'],
        "no routers to tune",
    ),
    "calibrate spec unknown key": (["calibrate", "{a}", "--task", "gen", "--spec", '{{"qa_itemz": 1}}'], "qa_itemz"),
    "evaluate spec unknown key": (["evaluate", "{a}", "--spec", '{{"bogus": 1}}'], "bogus"),
    "evaluate meta unparsable": (["evaluate", "{a}", "--meta", '{{"a": '], "--meta"),
    "train unknown model key": (
        ["train-tiny", "--model", '{{"hiden_size": 32}}', "--train", '{{"steps": 1}}'],
        "hiden_size",
    ),
    "train negative size": (
        ["train-tiny", "--model", '{{"hidden_size": -32}}', "--train", '{{"steps": 1}}'],
        "hidden_size",
    ),
    "train unknown key": (["train-tiny", "--train", '{{"stpes": 1}}'], "stpes"),
    "train wrong type": (["train-tiny", "--train", '{{"lr": "fast"}}'], "lr"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_argument_is_refused_before_any_work(artifacts, tmp_path, capsys, case):
    argv, naming = BAD_ARGS[case]
    fill = {"a": artifacts / "a", "cal": artifacts / "a.safetensors", "m": tmp_path / "metrics.json"}
    argv = [a.format(**fill) for a in argv]
    out = tmp_path / "out"
    refused(capsys, *argv, "--out", out if argv[0] != "calibrate" else tmp_path / "s.safetensors", naming=naming)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was written before the error"


ARGPARSE_BAD = {
    "keep ratio above one": ["prune-width", "m", "--component", "gen", "--keep-ratio", "1.5", "--out", "o"],
    "keep ratio zero": ["prune-width", "m", "--component", "gen", "--keep-ratio", "0", "--out", "o"],
    "keep ratio nan": ["prune-width", "m", "--component", "gen", "--keep-ratio", "nan", "--out", "o"],
    "negative drop": ["prune-depth", "m", "--calibration", "c", "--component", "und", "--drop", "-1", "--out", "o"],
    "zero experts": ["partition", "m", "--component", "gen", "--num-experts", "0", "--top-k", "1", "--out", "o"],
    "dense layers garbage": [
        "partition",
        "m",
        "--component",
        "gen",
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--dense-layers",
        "1;rm",
        "--out",
        "o",
    ],
    "unknown component": ["prune-width", "m", "--component", "vision", "--keep-ratio", "0.5", "--out", "o"],
    "unknown score": [
        "prune-width",
        "m",
        "--component",
        "gen",
        "--keep-ratio",
        "0.5",
        "--score",
        "magic",
        "--out",
        "o",
    ],
}


@pytest.mark.parametrize("case", sorted(ARGPARSE_BAD))
def test_malformed_option_is_a_usage_error(tmp_path, capsys, case):
    assert run_cli(*ARGPARSE_BAD[case]) == 2
    assert "error:" in capsys.readouterr().err


def test_tune_moe_bad_eval_spec_fails_before_tuning(artifacts, tmp_path, capsys):
    moe = convert_to_moe(load_model(artifacts / "a"), "gen", 4, 2, dense_layers="none")
    save_model(moe, tmp_path / "moe")
    refused(
        capsys,
        "tune-moe",
        tmp_path / "moe",
        "--mode",
        "frozen",
        "--spec",
        json.dumps(TUNE),
        "--checkpoint-dir",
        tmp_path / "ck",
        "--summary",
        tmp_path / "summary.json",
        "--out",
        tmp_path / "out",
        "--metrics",
        tmp_path / "m.json",
        "--eval-spec",
        '{"bogus": 1}',
        naming="bogus",
    )
    assert not any((tmp_path / n).exists() for n in ("ck", "summary.json", "out", "m.json"))


# --- item 7: flipped bytes ----------------------------------------------------------------------------


def flip_tensor_byte(path: Path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x40  # inside the tensor data, header intact
    path.write_bytes(bytes(data))


def test_flipped_tensor_byte_is_detected_naming_the_file(tmp_path, capsys):
    save_dense(tmp_path / "m")
    flip_tensor_byte(tmp_path / "m/model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        load_model(tmp_path / "m")
    refused(capsys, "evaluate", tmp_path / "m", "--out", tmp_path / "metrics.json", naming="model.safetensors")
    assert not (tmp_path / "metrics.json").exists()


def test_corrupted_calibration_is_detected_naming_the_file(artifacts, tmp_path, capsys):
    for name in ("a.safetensors", "a.safetensors.json"):
        (tmp_path / name).write_bytes((artifacts / name).read_bytes())
    flip_tensor_byte(tmp_path / "a.safetensors")
    with pytest.raises(IntegrityError, match="a.safetensors is corrupted"):
        Calibration.load(tmp_path / "a.safetensors")
    refused(
        capsys,
        "prune-depth",
        artifacts / "a",
        "--calibration",
        tmp_path / "a.safetensors",
        "--component",
        "und",
        "--drop",
        "1",
        "--out",
        tmp_path / "out",
        naming="a.safetensors",
    )


# --- items 2 and 8: checkpoints resumed only from their own input; the whole history kept -------------------


@pytest.fixture(scope="module")
def moe_pair(artifacts):
    """Two MoE models of the same structure made from different dense models."""
    return [convert_to_moe(load_model(artifacts / n), "gen", 4, 2, dense_layers="none") for n in ("a", "c")]


def fresh(moe):
    copy = type(moe)(moe.config)
    copy.load_state_dict(moe.state_dict())
    return copy.eval()


def test_checkpoint_of_another_input_model_is_not_resumed(moe_pair, tmp_path, caplog):
    a, b = moe_pair
    clean_b = fresh(b)
    tune_moe(clean_b, "gen", "full", TUNE, progress=False)
    tune_moe(fresh(a), "gen", "full", TUNE, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=3)
    assert (tmp_path / "ck/last/meta.json").is_file()
    resumed_b = fresh(b)
    with caplog.at_level("WARNING"):
        summary = tune_moe(resumed_b, "gen", "full", TUNE, checkpoint_dir=tmp_path / "ck", progress=False)
    assert "another input model" in caplog.text and "starting full tuning over" in caplog.text
    for (name, x), y in zip(clean_b.state_dict().items(), resumed_b.state_dict().values()):
        assert torch.equal(x, y), name
    assert [h["step"] for h in summary["history"]] == [0, 5]


def test_checkpoint_with_corrupted_state_is_not_resumed(moe_pair, tmp_path, caplog):
    a, _ = moe_pair
    clean = fresh(a)
    tune_moe(clean, "gen", "full", TUNE, progress=False)
    tune_moe(fresh(a), "gen", "full", TUNE, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=3)
    flip_tensor_byte(tmp_path / "ck/last/rank-00000-of-00001.safetensors")
    resumed = fresh(a)
    with caplog.at_level("WARNING"):
        tune_moe(resumed, "gen", "full", TUNE, checkpoint_dir=tmp_path / "ck", progress=False)
    assert "corrupted" in caplog.text
    assert all(torch.equal(x, y) for x, y in zip(clean.state_dict().values(), resumed.state_dict().values()))


def test_resumed_summary_holds_the_whole_history(moe_pair, tmp_path):
    a, _ = moe_pair
    spec = {**TUNE, "steps": 120, "checkpoint_every": 10, "batch_gen": 2}
    straight = tune_moe(fresh(a), "gen", "frozen", spec, progress=False)
    tune_moe(fresh(a), "gen", "frozen", spec, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=70)
    resumed = tune_moe(fresh(a), "gen", "frozen", spec, checkpoint_dir=tmp_path / "ck", progress=False)
    assert [h["step"] for h in straight["history"]] == [0, 50, 100, 119]
    assert resumed["history"] == straight["history"]


# --- item 11: the user's umask ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_artifacts_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        model = save_dense(tmp_path / "m")
        save_calibration(model, tmp_path / "m", tmp_path / "cal/gen.safetensors")
    finally:
        os.umask(old)
    paths = [tmp_path / "m", *(tmp_path / "m").iterdir(), tmp_path / "cal", *(tmp_path / "cal").iterdir()]
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


# --- concurrency: writers of the same artifact ---------------------------------------------------------


def _save_repeatedly(args):
    out, seed = args
    model = make_model(seed)
    for _ in range(8):
        save_model(model, out)
    return seed


def test_concurrent_writers_of_one_model_leave_one_complete_model(tmp_path):
    """Two processes saving different models to the same directory (two pipelines sharing
    results/): every save succeeds and the directory ends complete, verified, one writer's model."""
    import multiprocessing

    out = tmp_path / "m"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert sorted(pool.map(_save_repeatedly, [(out, 0), (out, 1)])) == [0, 1]
    model = load_model(out)  # verifies SHA256SUMS: no mix of the two writers' files
    digests = {seed: make_model(seed).state_dict() for seed in (0, 1)}
    assert any(all(torch.equal(v, d[k]) for k, v in model.state_dict().items()) for d in digests.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "temporary or trash directories left behind"


def test_interrupted_directory_replacement_keeps_the_previous_copy(tmp_path, monkeypatch):
    """A run stopped between moving the old checkpoint aside and putting the new one in place loses
    nothing: the old copy stays complete under its aside name, and tuning resumes from it."""
    from unisparse import io as io_mod
    from unisparse.trainloop import Checkpoint

    final = tmp_path / "last"
    with io_mod.atomic_path(final, is_dir=True) as tmp:
        (tmp / "meta.json").write_text('{"step": 1}')
    real_rename = os.rename
    tries = []

    def interrupted(src, dst):
        if Path(src).name.startswith(".last.tmp-"):
            tries.append(src)
            if len(tries) == 2:  # the old copy was moved aside; the new one never lands
                raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(io_mod.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with io_mod.atomic_path(final, is_dir=True) as tmp:
            (tmp / "meta.json").write_text('{"step": 2}')
    monkeypatch.setattr(io_mod.os, "rename", real_rename)
    assert not final.exists()
    (aside,) = io_mod.aside_copies(final)
    assert json.loads((aside / "meta.json").read_text()) == {"step": 1}
    ckpt = Checkpoint(tmp_path, {"input_model_sha256": "x", "data_sha256": "y", "spec": {}, "names": []})
    meta, why_not = ckpt.resumable()
    assert ckpt.source == aside and ckpt.path == final  # resumed from the copy, saved to `last` again
    assert meta is None and "another input model" in why_not  # (this meta has no provenance)
