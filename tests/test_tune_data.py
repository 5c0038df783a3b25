"""Tuning on real text-to-image data (``unisparse.tunedata``): raw sources in their real layouts, the
prepare stage (decode, fit, encode once, tokenise, contamination check, verified shards), the seeded
resumable reading, and the flow and distill objectives on prepared latents.

The tiny MoT (identity codec, the shapes vocabulary) keeps these fast; the FLUX-AE BAGEL layout and
the tiny Qwen-Image pipeline are in ``test_tune_data_models.py`` and the Snakemake runs in
``test_tune_data_workflow.py``."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

from helpers.cli import cli, refused, run_cli
from helpers.models import make_model, save_dense
from helpers.tune_data import (
    SHAPES_CAPTIONS,
    encoded,
    import_fake_bagel,
    picture,
    prepare_argv,
    write_parquet,
    write_tar,
)
from unisparse.evaluate.geneval import load_metadata
from unisparse.families import family_for, load_family
from unisparse.io import IntegrityError
from unisparse.moe.objectives import latent_batch_loss, share_frozen
from unisparse.moe.tune import TUNE_DEFAULTS, trainable_names, tune_moe
from unisparse.tunedata.contamination import ContaminationCheck, ContaminationError, normalise
from unisparse.tunedata.images import SmallImageError, decode_image, fit
from unisparse.tunedata.latents import LatentOrder, LatentSet
from unisparse.tunedata.prepare import check_settings
from unisparse.tunedata.sources import SourceError, read_records

WEBDATASET = {"source": "webdataset", "shard_size": 3, "batch_size": 2}
TUNE = {"steps": 8, "batch_gen": 4, "lr": 1e-3, "checkpoint_every": 2, "threads": 1}


class _World:
    """One process (the loop's ``distributed.world`` on a single device)."""

    sharded, size, rank = False, 1, 0

    def slice(self, n):
        return slice(0, n)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "dense"
    save_dense(path)
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_tar(root / "wds" / "part-0.tar", SHAPES_CAPTIONS[:5], seed=0)
    write_tar(root / "wds" / "part-1.tar", SHAPES_CAPTIONS[5:], seed=1)
    write_parquet(root / "parquet" / "t2i-0.parquet", SHAPES_CAPTIONS, variants={"again": lambda c: c})
    (root / "captions").mkdir()
    (root / "captions" / "captions.txt").write_text("\n".join(SHAPES_CAPTIONS[:4]) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(dense, raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "wds"
    cli("prepare-tune-data", dense, "--source-dir", raw / "wds", "--settings", json.dumps(WEBDATASET), "--out", out)
    return out


# --- sources ----------------------------------------------------------------------------------------


def test_webdataset_members_pair_by_key_and_unpaired_ones_are_counted(tmp_path):
    tar = write_tar(
        tmp_path / "a.tar",
        SHAPES_CAPTIONS[:2],
        extra=[("lonely.jpg", encoded(picture(9))), ("dir/x.json", b'{"prompt": "a lime tee"}'), ("notes.txt", b"hi")],
    )
    skipped = Counter()
    records = list(read_records(tar, {**check_settings(WEBDATASET)}, skipped))
    assert [r.caption for r in records] == SHAPES_CAPTIONS[:2]
    assert records[0].key == "a.tar:000000000" and records[0].image[:2] == b"\xff\xd8"  # a JPEG
    assert skipped == {"incomplete": 2}


def test_webdataset_caption_keys_txt_and_json_field(tmp_path):
    tar = write_tar(tmp_path / "a.tar", ["a lime tee"])
    with pytest.raises(SourceError, match="no string 'caption'"):
        list(read_records(tar, check_settings({**WEBDATASET, "caption_field": "caption"}), Counter()))


def test_bagel_parquet_draws_one_caption_per_row_from_the_seed(raw):
    settings = check_settings({"source": "bagel_parquet"})
    first = [r.caption for r in read_records(raw / "parquet", settings, Counter())]
    again = [r.caption for r in read_records(raw / "parquet", settings, Counter())]
    assert first == again == SHAPES_CAPTIONS  # both captions of a row are the same text here
    rows = list(read_records(raw / "parquet", settings, Counter()))
    assert rows[0].key == "t2i-0.parquet:0" and decode_image(rows[0].image, "x").size == (48, 40)


def test_a_source_without_its_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .tar files"):
        read_records(tmp_path / "empty", check_settings(WEBDATASET), Counter())


# --- images -----------------------------------------------------------------------------------------


def test_fit_covers_then_centre_crops():
    from PIL import Image

    image = Image.fromarray(picture(0, size=(64, 32)))
    out = fit(image, (16, 16), "refuse", "x")
    assert out.shape == (16, 16, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    # the crop is the middle: the resized image is 32 x 16, the crop starts 8 pixels in
    resized = np.asarray(image.resize((32, 16), Image.Resampling.BICUBIC, reducing_gap=None), dtype=np.float32) / 255
    assert np.array_equal(out, resized[:, 8:24])


def test_small_images_are_refused_skipped_or_upscaled_as_configured():
    from PIL import Image

    small = Image.fromarray(picture(0, size=(12, 20)))
    with pytest.raises(SmallImageError, match="12x20 pixels is smaller than the training resolution 16x16"):
        fit(small, (16, 16), "refuse", "a.tar:7")
    assert fit(small, (16, 16), "skip", "x") is None
    assert fit(small, (16, 16), "upscale", "x").shape == (16, 16, 3)


def test_prepare_refuses_a_set_with_images_below_the_resolution(dense, tmp_path, capsys):
    write_tar(tmp_path / "raw" / "a.tar", SHAPES_CAPTIONS[:2], size=(10, 10))
    argv = prepare_argv(dense, tmp_path / "raw", WEBDATASET, tmp_path / "p")
    refused(capsys, *argv, naming="smaller than the training resolution 16x16")
    assert not (tmp_path / "p").exists()
    argv = prepare_argv(dense, tmp_path / "raw", {**WEBDATASET, "small_images": "skip"}, tmp_path / "p")
    refused(capsys, *argv, naming="no tuning examples were read")


# --- contamination ----------------------------------------------------------------------------------


def test_exact_and_near_matches_of_evaluation_prompts():
    check = ContaminationCheck({"geneval": ["a photo of a cat", "a red bench and a blue clock on a sunny street"]}, {})
    check.add("k1", "A photo of a CAT!")  # exact after normalisation
    check.add("k2", "a photo of a cat sleeping on a sofa")  # the short prompt inside a caption
    check.add("k3", "look: a red bench and a blue clock on a sunny street, at noon")  # all 4 of its 8-grams
    check.add("k4", "red bench and a blue clock on a sunny street")  # 3 of 4 8-grams: below near_overlap 0.8
    check.add("k5", "a dog running in a field of flowers")
    assert normalise("A  photo, of a CAT!") == "a photo of a cat"
    assert check.counts == {"exact": 1, "near": 2} and [e["key"] for e in check.examples] == ["k1", "k2", "k3"]
    with pytest.raises(ContaminationError, match="1 exact and 2 near-duplicate captions of 5"):
        check.verdict()


def test_a_tar_of_geneval_prompts_is_refused_naming_them(tmp_path, capsys):
    prompts = [e["prompt"] for e in load_metadata("short")[:3]]
    write_tar(tmp_path / "raw" / "a.tar", SHAPES_CAPTIONS[:5] + prompts)
    # GenEval's prompts hold words the shapes vocabulary lacks: the BAGEL-layout tokenizer reads anything
    model = import_fake_bagel(tmp_path)
    argv = prepare_argv(model, tmp_path / "raw", WEBDATASET, tmp_path / "p")
    line = refused(capsys, *argv, naming="the tuning data holds evaluation prompts: 3 exact")
    assert all(repr(p) in line for p in prompts), line
    assert not (tmp_path / "p").exists()


# --- prepare and read ------------------------------------------------------------------------------


def test_the_manifest_counts_shards_and_pins_the_codec(prepared, dense, raw):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["count"] == 8 and [s["count"] for s in m["shards"]] == [3, 3, 2]
    family = load_family(dense)
    assert m["codec"]["sha256"] == family.codec_digest() and m["latent_shape"] == list(family.noise_shape(1)[1:])
    assert m["contamination"]["checked"] == 8 and m["contamination"]["exact"] == 0
    assert m["contamination"]["benchmarks"] == {"geneval_short": 553, "geneval_long": 553}
    assert [i["file"] for i in m["inputs"]] == ["part-0.tar", "part-1.tar"]
    from unisparse.io import sha256_file

    assert m["inputs"][0]["sha256"] == sha256_file(raw / "wds" / "part-0.tar")
    assert m["posterior"] is False  # the identity codec is deterministic


def test_prepared_latents_decode_back_to_the_images(prepared, raw, dense):
    """The identity codec's latents decode to the fitted images exactly (its reconstruction error is 0)."""
    family = load_family(dense)
    data = LatentSet(prepared)
    records = list(read_records(raw / "wds", check_settings(WEBDATASET), Counter()))
    images = np.stack([fit(decode_image(r.image, r.key), family.training_size, "refuse", r.key) for r in records])
    mean, std, ids = data.rows(range(len(data)))
    decoded = family.decode_latents(mean)
    assert torch.allclose(decoded, torch.from_numpy(images), atol=1e-6)
    assert float(std.abs().max()) == 0.0
    assert ids == [family.encode(r.caption) for r in records] and data.captions() == [r.caption for r in records]


def test_bagel_parquet_and_teacher_sources_prepare(dense, raw, tmp_path):
    cli("prepare-tune-data", dense, "--source-dir", raw / "parquet", "--settings", '{"source": "bagel_parquet"}',
        "--out", tmp_path / "pq")  # fmt: skip
    assert len(LatentSet(tmp_path / "pq")) == 8
    settings = json.dumps({"source": "teacher", "teacher_steps": 2, "batch_size": 3})
    cli("prepare-tune-data", dense, "--source-dir", raw / "captions", "--settings", settings, "--out", tmp_path / "t")
    teacher = LatentSet(tmp_path / "t")
    assert len(teacher) == 4 and teacher.captions() == SHAPES_CAPTIONS[:4]
    family = load_family(dense)
    seeds_image = family.decode_latents(teacher.rows([0])[0])
    assert seeds_image.shape == (1, 16, 16, 3)


def test_a_changed_shard_is_refused_naming_it(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    with open(copy / "shard-00001.safetensors", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError, match="shard shard-00001.safetensors does not match its sha256"):
        LatentSet(copy)


def test_the_order_is_a_function_of_seed_and_position():
    order = LatentOrder(5, seed=3)
    run = order.take(4) + order.take(4) + order.take(4)
    assert sorted(run[:5]) == list(range(5)) and sorted(run[5:10]) == list(range(5))  # epochs are permutations
    resumed = LatentOrder(5, seed=3)
    resumed.restore({"position": 6, "count": 5, "seed": 3})
    assert resumed.take(6) == run[6:12]
    assert LatentOrder(5, seed=4).take(12) != run
    with pytest.raises(ValueError, match="not of this data"):
        resumed.restore({"position": 1, "count": 6, "seed": 3})


# --- tuning on prepared latents ------------------------------------------------------------------


def test_tuning_reads_the_prepared_latents_and_records_their_digest(prepared, dense):
    family = load_family(dense)
    before = {k: v.clone() for k, v in family.model.state_dict().items()}
    data = LatentSet(prepared)
    summary = tune_moe(family, "gen", "full", TUNE, progress=False, data=data)
    assert summary["data"] == {"sha256": data.digest, "examples": 8}
    changed = {k for k, v in family.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(trainable_names(family, "gen", "full"))


def test_a_resumed_run_mid_shard_ends_with_the_uninterrupted_weights(prepared, dense, tmp_path, caplog):
    straight = load_family(dense)
    tune_moe(straight, "gen", "full", TUNE, progress=False, data=LatentSet(prepared))
    interrupted = load_family(dense)
    # batch 4 over shards of 3: the checkpoint at step 2 sits at example 8 of an epoch of 8, step 3 mid-shard
    tune_moe(interrupted, "gen", "full", {**TUNE, "checkpoint_every": 3}, checkpoint_dir=tmp_path / "ck",
             progress=False, stop_after=4, data=LatentSet(prepared))  # fmt: skip
    meta = json.loads((tmp_path / "ck" / "last" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["data_position"] == {"position": 12, "count": 8, "seed": 0}
    resumed = load_family(dense)
    with caplog.at_level("INFO"):
        tune_moe(resumed, "gen", "full", {**TUNE, "checkpoint_every": 3}, checkpoint_dir=tmp_path / "ck",
                 progress=False, data=LatentSet(prepared))  # fmt: skip
    assert "resuming full tuning from step 3" in caplog.text
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_data_refuses_the_resume_and_starts_over(prepared, dense, raw, tmp_path, capfd):
    tune_moe(load_family(dense), "gen", "full", TUNE, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=3,
             data=LatentSet(prepared))  # fmt: skip
    write_tar(tmp_path / "raw" / "part-0.tar", SHAPES_CAPTIONS[:5], seed=7)  # one shard's images changed
    (tmp_path / "raw" / "part-1.tar").write_bytes((raw / "wds" / "part-1.tar").read_bytes())
    cli("prepare-tune-data", dense, "--source-dir", tmp_path / "raw", "--settings", json.dumps(WEBDATASET),
        "--out", tmp_path / "changed")  # fmt: skip
    capfd.readouterr()
    tune_moe(load_family(dense), "gen", "full", TUNE, checkpoint_dir=tmp_path / "ck", progress=False,
             data=LatentSet(tmp_path / "changed"))  # fmt: skip
    err = capfd.readouterr().err  # the CLI's log handler (set by the prepare above) writes to stderr
    assert "not resuming from checkpoint" in err and "it was made from other training data" in err


@pytest.mark.slow
def test_a_killed_tuning_process_resumes_to_byte_identical_weights(prepared, dense, tmp_path):
    """SIGKILL during tuning (after a checkpoint, mid-shard), then the same command again: the saved
    model is byte for byte the one an uninterrupted run saves."""
    # 8 examples in shards of 3, 3, 2; batch 4: the checkpoints at steps 7, 21 and 35 sit at example 4 of
    # an epoch, inside the second shard
    spec = json.dumps({**TUNE, "steps": 40, "checkpoint_every": 7})

    def command(out, ck):
        return [sys.executable, "-m", "unisparse", "--no-progress", "tune-moe", str(dense), "--mode", "full",
                "--spec", spec, "--data", str(prepared), "--checkpoint-dir", str(ck), "--out", str(out)]  # fmt: skip

    subprocess.run(command(tmp_path / "straight", tmp_path / "ck0"), check=True, capture_output=True)
    proc = subprocess.Popen(command(tmp_path / "resumed", tmp_path / "ck1"), stderr=subprocess.PIPE)
    meta = tmp_path / "ck1" / "last" / "meta.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if meta.is_file() and json.loads(meta.read_text())["step"] % 14 == 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(meta.read_text())["step"]
    assert step < 40 and (step * 4) % 8 == 4, step  # the reading position is inside a shard
    done = subprocess.run(command(tmp_path / "resumed", tmp_path / "ck1"), check=True, capture_output=True, text=True)
    assert f"resuming full tuning from step {step}" in done.stderr
    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "model.safetensors").read_bytes()


# --- objectives ----------------------------------------------------------------------------------


def test_distill_of_a_student_identical_to_its_teacher_is_exactly_zero_with_zero_gradients(prepared, dense):
    student, teacher = load_family(dense), load_family(dense)
    names = trainable_names(student, "gen", "full")
    shared = share_frozen(teacher, student, names)
    assert shared > 0 and all(
        teacher.model.get_parameter(n) is not student.model.get_parameter(n) for n in names
    )  # only the tuned component is held twice
    params = dict(student.model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    mean, std, ids = LatentSet(prepared).rows(range(4))
    cfg = {**TUNE_DEFAULTS, "objective": "distill"}
    loss = latent_batch_loss(student, ids, mean, std, cfg, torch.Generator().manual_seed(0), _World(), teacher)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(params[n].grad is not None and float(params[n].grad.abs().max()) == 0.0 for n in names)


def test_distill_of_an_untuned_moe_falls_over_the_steps(prepared, dense, tmp_path):
    from unisparse.moe.convert import convert_to_moe

    dense_family = load_family(dense)
    moe = convert_to_moe(dense_family, "gen", 8, 2, dense_layers="none", method="random", seed=0)
    spec = {**TUNE, "steps": 30, "lr": 3e-3, "objective": "distill"}
    summary = tune_moe(moe, "gen", "full", spec, progress=False, data=LatentSet(prepared), teacher=load_family(dense))
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < 0.8 * losses[0], losses


def test_distill_without_a_teacher_is_refused(dense, prepared, capsys):
    refused(capsys, "tune-moe", dense, "--mode", "full", "--spec", '{"objective": "distill"}', "--data", prepared,
            "--out", "nowhere", naming="objective distill needs --teacher")  # fmt: skip


def test_shapes_tuning_is_unchanged_by_the_data_seam():
    """The default path (no data, objective flow) is the shapes world's ``tasks.gen_batch_loss``: the
    same loss history as a loop that calls it directly."""
    from unisparse import tasks
    from unisparse.moe.tune import shapes_examples
    from unisparse.trainloop import run_training

    a, b = make_model(), make_model()
    spec = {**TUNE, "steps": 3}
    tuned = tune_moe(a, "gen", "full", spec, progress=False)
    fam = family_for(b)
    names = trainable_names(fam, "gen", "full")
    cfg = {**TUNE_DEFAULTS, **spec}

    def batch_loss(m, rng, gen, world):
        loss = tasks.gen_batch_loss(
            fam.with_model(m), shapes_examples(rng, cfg["batch_gen"]), cfg["cond_dropout"], gen, world
        )
        return loss, {"loss": loss}

    run = run_training(b, names, cfg, batch_loss, what="full tuning", progress=False, log_every=50)
    assert tuned["history"] == run["history"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- refusals before any job ---------------------------------------------------------------------


def _checked(edit):
    import yaml

    from helpers.workflow import MICRO, REPO
    from unisparse.config_checks import ConfigError, check_config, validate_config

    config = yaml.safe_load((REPO / MICRO).read_text())
    edit(config)
    try:
        validate_config(config, REPO / "workflow/schemas/config.schema.yaml")
        check_config(config)
    except ConfigError as e:
        return str(e)
    return None


def test_a_real_checkpoint_tuned_on_the_shapes_world_is_refused_at_dag_time():
    def real(config):
        config["checkpoint"] = {"source": "huggingface", "lock": "data/bagel-7b-mot.lock.json"}

    assert "moe.tune.data.source: 'shapes' (the embedded toy world) cannot tune a huggingface checkpoint" in _checked(
        real
    )

    def real_with_data(config):
        real(config)
        config["moe"]["tune"]["data"] = {"source": "webdataset", "lock": "data/text-to-image-2m.lock.json"}

    assert _checked(real_with_data) is None
    assert _checked(lambda c: c["moe"]["tune"].update(data={"source": "shapes"})) is None  # the default, said


def test_a_prepared_source_without_its_files_or_with_a_bad_setting_is_refused_at_dag_time():
    assert "moe.tune.data" in _checked(lambda c: c["moe"]["tune"].update(data={"source": "webdataset"}))
    bad = {"source": "teacher", "path": "x", "small_images": "stretch"}
    assert "moe.tune.data.small_images" in _checked(lambda c: c["moe"]["tune"].update(data=bad))
    assert "moe.tune.full.objective" in _checked(lambda c: c["moe"]["tune"]["full"].update(objective="kl"))


def test_the_paper_and_qwen_image_configs_tune_on_the_locked_dataset():
    import yaml

    from helpers.workflow import REPO
    from unisparse.hub import read_lock

    for name in ("paper", "qwen_image"):
        config = yaml.safe_load((REPO / f"workflow/config/{name}.yaml").read_text())
        data = config["moe"]["tune"]["data"]
        assert data["source"] == "webdataset" and data["lock"] == "data/text-to-image-2m.lock.json", name
    lock = read_lock(REPO / "data/text-to-image-2m.lock.json", complete=False)
    assert lock["repo_id"] == "jackyhate/text-to-image-2M" and lock["repo_type"] == "dataset"


def test_a_locked_hub_dataset_is_fetched_and_verified_offline(tmp_path, monkeypatch, offline):
    """`download_tune_data`'s verb on a dataset repository (``repo_type: dataset``) in the Hugging Face
    cache: every file checked against the lock; a tar whose bytes differ from its sum is refused."""
    import hashlib

    from helpers.benchmarks import write_dataset

    commit = "e4ece89e640210e9fc3fd0966f5a45291bdb665c"
    tar = write_tar(tmp_path / "a.tar", SHAPES_CAPTIONS[:2]).read_bytes()
    write_dataset(tmp_path / "hub", "jackyhate/text-to-image-2M", commit, {"data_1024_10K/data_000000.tar": tar})
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import
    entry = {"sha256": hashlib.sha256(tar).hexdigest(), "size": len(tar)}
    lock = {"repo_id": "jackyhate/text-to-image-2M", "repo_type": "dataset", "revision": commit,
            "files": {"data_1024_10K/data_000000.tar": entry}}  # fmt: skip
    (tmp_path / "lock.json").write_text(json.dumps(lock))
    cli("fetch-checkpoint", "--lock", tmp_path / "lock.json", "--out", tmp_path / "raw")
    assert (tmp_path / "raw" / "data_1024_10K" / "data_000000.tar").read_bytes() == tar
    lock["files"]["data_1024_10K/data_000000.tar"] = {**entry, "sha256": "0" * 64}
    (tmp_path / "lock.json").write_text(json.dumps(lock))
    assert run_cli("fetch-checkpoint", "--lock", tmp_path / "lock.json", "--out", tmp_path / "raw2") == 2
    assert not (tmp_path / "raw2").exists()
