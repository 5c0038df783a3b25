"""Prepared tuning data through the real codecs: the FLUX autoencoder of a BAGEL-layout checkpoint
(``models.bagel.write_fake_checkpoint``, imported strictly) and the VAE of a tiny Qwen-Image pipeline.
The prepared latents decode back to the images within the codec's own reconstruction error, the
posterior is stored so the target can be drawn as BAGEL's trainer draws it, and a model whose codec
differs is refused."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from helpers.cli import cli
from helpers.tune_data import CAPTIONS, SHAPES_CAPTIONS, import_fake_bagel, write_parquet, write_tar
from unisparse.families import load_family
from unisparse.models.flux_autoencoder import patchify_latent
from unisparse.moe.tune import tune_moe
from unisparse.tunedata.images import decode_image, fit
from unisparse.tunedata.latents import LatentSet
from unisparse.tunedata.prepare import check_settings
from unisparse.tunedata.sources import read_records

WEBDATASET = {"source": "webdataset", "shard_size": 3, "batch_size": 4}
TUNE = {"steps": 3, "batch_gen": 2, "checkpoint_every": 3, "threads": 1}


@pytest.fixture(scope="module")
def bagel(tmp_path_factory):
    root = tmp_path_factory.mktemp("bagel")
    dense = import_fake_bagel(root)
    write_tar(root / "raw" / "a.tar", CAPTIONS[:6], size=(56, 40))
    write_parquet(root / "parquet" / "a.parquet", CAPTIONS[:4], size=(40, 40))
    cli("prepare-tune-data", dense, "--source-dir", root / "raw", "--settings", json.dumps(WEBDATASET),
        "--out", root / "prepared")  # fmt: skip
    return root, dense


def fitted_images(raw, family, settings):
    records = list(read_records(raw, check_settings(settings), Counter()))
    return np.stack([fit(decode_image(r.image, r.key), family.training_size, "refuse", r.key) for r in records])


def test_bagel_latents_decode_within_the_flux_autoencoders_own_reconstruction_error(bagel):
    root, dense = bagel
    family = load_family(dense)
    data = LatentSet(root / "prepared")
    assert data.manifest["posterior"] is True and data.manifest["latent_shape"] == [4, 64]  # 32 px: 2 x 2 tokens
    images = torch.from_numpy(fitted_images(root / "raw", family, WEBDATASET))
    mean, std, ids = data.rows(range(len(data)))
    codec = family.model.codec
    with torch.no_grad():
        own = codec.decode(codec.encode(images))  # the codec's own round trip (the posterior's mean)
        decoded = family.decode_latents(mean)
    assert torch.allclose(decoded, own, atol=1e-5)
    own_error, error = (own - images).abs().mean(), (decoded - images).abs().mean()
    assert abs(float(error - own_error)) < 1e-6, (float(error), float(own_error))
    assert bool((std > 0).all()) and ids[0] == family.encode(CAPTIONS[0])


def test_the_stored_posterior_draws_exactly_what_the_autoencoder_samples(bagel):
    """``mean + std * noise`` from the stored moments is ``FluxCodec.encode(sample=True)`` with that noise."""
    root, dense = bagel
    family = load_family(dense)
    images = torch.from_numpy(fitted_images(root / "raw", family, WEBDATASET)[:2])
    codec = family.model.codec
    with torch.no_grad():
        sampled = codec.encode(images, generator=torch.Generator().manual_seed(5))
        moments = codec.moments(images)
        latent_shape = (2, codec.z_channels, 32 // codec.downsample, 32 // codec.downsample)
        noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(5))
    drawn = moments[0] + moments[1] * patchify_latent(noise, codec.patch_size)
    assert torch.allclose(drawn, sampled, atol=1e-5)


def test_sampled_and_mean_targets_tune_differently(bagel):
    root, dense = bagel
    runs = {}
    for latent in ("sample", "mean"):
        family = load_family(dense)
        tune_moe(family, "gen", "full", {**TUNE, "latent": latent}, progress=False, data=LatentSet(root / "prepared"))
        runs[latent] = family.model.state_dict()
    assert any(not torch.equal(runs["sample"][k], runs["mean"][k]) for k in runs["sample"])


def test_a_model_with_another_codec_is_refused(bagel, tmp_path):
    root, _ = bagel
    other = load_family(import_fake_bagel(tmp_path, seed=1))  # another FLUX AE (and LLM) initialisation
    with pytest.raises(ValueError, match="encoded by another codec"):
        tune_moe(other, "gen", "full", TUNE, progress=False, data=LatentSet(root / "prepared"))


def test_bagel_parquet_through_the_flux_autoencoder(bagel, tmp_path):
    root, dense = bagel
    cli("prepare-tune-data", dense, "--source-dir", root / "parquet", "--settings", '{"source": "bagel_parquet"}',
        "--out", tmp_path / "pq")  # fmt: skip
    data = LatentSet(tmp_path / "pq")
    assert len(data) == 4 and all(c.startswith(tuple(CAPTIONS[:4])) for c in data.captions())


def test_qwen_image_latents_decode_within_the_vaes_own_reconstruction_error(tmp_path):
    pytest.importorskip("diffusers")
    from helpers.qwen_image import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "raw")
    cli("import-qwen-image", "--src", tmp_path / "raw", "--out", tmp_path / "dense")
    family = load_family(tmp_path / "dense")
    H, W = family.training_size
    write_tar(tmp_path / "wds" / "a.tar", SHAPES_CAPTIONS[:4], size=(W + 8, H + 4))
    cli("prepare-tune-data", tmp_path / "dense", "--source-dir", tmp_path / "wds", "--settings", json.dumps(WEBDATASET),
        "--out", tmp_path / "prepared")  # fmt: skip
    data = LatentSet(tmp_path / "prepared")
    assert data.manifest["latent_shape"] == list(family.noise_shape(1)[1:])
    images = torch.from_numpy(fitted_images(tmp_path / "wds", family, WEBDATASET))
    mean, _, _ = data.rows(range(len(data)))
    tasks = family.tasks
    with torch.no_grad():
        own = tasks.decode_latents(tasks.encode_images(images))
        decoded = family.decode_latents(mean)
    assert torch.allclose(decoded, own, atol=1e-5)
    summary = tune_moe(family, "gen", "full", TUNE, progress=False, data=data)
    assert summary["data"]["examples"] == 4 and len(summary["history"]) == 2
