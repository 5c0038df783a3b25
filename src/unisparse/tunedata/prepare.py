"""The prepare stage: raw tuning data -> safetensors shards of pre-encoded latents and token ids.

Every image is decoded, brought to the family's training resolution (``images.fit``) and encoded
*once* through the family's own codec, which stores its posterior's mean and standard deviation (so
tuning can draw the target as BAGEL's trainer does, or take the mean); every caption is tokenised
with the model's tokenizer and checked against the evaluation prompts (``contamination``). Tuning
then reads latents and never runs the codec.

The output directory holds ``shard-NNNNN.safetensors`` files and ``manifest.json`` (counts, each
shard's sha256, the codec's weights hash, the settings, the contamination report); the sha256 of the
manifest is the data's identity in a tuning checkpoint. The directory appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..choices import LATENT_STORAGE_DTYPES, LATENT_TARGETS, SMALL_IMAGE_POLICIES, TUNE_DATA_SOURCES
from ..io import atomic_path, sha256_file
from .contamination import CONTAMINATION_DEFAULTS, ContaminationCheck
from .images import decode_image, fit

log = logging.getLogger(__name__)

FORMAT = "unisparse-tune-data"
VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {name: getattr(torch, name) for name in LATENT_STORAGE_DTYPES}

#: settings of a tuning data source (config ``moe.tune.data``)
PREPARE_DEFAULTS = dict(
    source="shapes",
    image_key="jpg",
    caption_key="json",
    caption_field="prompt",
    small_images="refuse",
    max_samples=None,
    shard_size=256,
    batch_size=8,
    latent_dtype="float32",
    seed=0,
    teacher_steps=20,
    teacher_cfg_scale=4.0,
    contamination=dict(CONTAMINATION_DEFAULTS),
)


def check_settings(settings: dict) -> dict:
    """``settings`` over the defaults, every value checked (a ``ValueError`` names the key)."""
    from ..spec import merge_spec

    s = merge_spec(PREPARE_DEFAULTS, settings, "tune data", kind="tune_data")
    s["contamination"] = merge_spec(
        CONTAMINATION_DEFAULTS, s["contamination"], "tune data contamination", kind="tune_data_contamination"
    )
    for key, allowed in (
        ("source", TUNE_DATA_SOURCES),
        ("small_images", SMALL_IMAGE_POLICIES),
        ("latent_dtype", LATENT_STORAGE_DTYPES),
    ):
        if s[key] not in allowed:
            raise ValueError(f"tune data setting {key}={s[key]!r}: expected one of {allowed}")
    return s


class ShardWriter:
    """Collects encoded examples and writes a shard every ``shard_size`` of them."""

    def __init__(self, directory: Path, shard_size: int, dtype: torch.dtype):
        self.directory, self.shard_size, self.dtype = directory, shard_size, dtype
        self.rows: list[tuple] = []
        self.shards: list[dict] = []
        self.any_std = False

    def add(self, key: str, caption: str, ids: list[int], mean: torch.Tensor, std: torch.Tensor) -> None:
        self.any_std = self.any_std or bool((std != 0).any())
        self.rows.append((key, caption, ids, mean, std))
        if len(self.rows) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        keys, captions, ids, means, stds = zip(*self.rows)
        tensors = {
            "mean": torch.stack(means).to(self.dtype).contiguous(),
            "std": torch.stack(stds).to(self.dtype).contiguous(),
            "ids": torch.tensor([i for row in ids for i in row], dtype=torch.int64),
            "id_offsets": torch.tensor(np.cumsum([0] + [len(r) for r in ids]), dtype=torch.int64),
            **_strings("caption", captions),
            **_strings("key", keys),
        }
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self.directory / name))
        self.shards.append({"file": name, "count": len(self.rows), "sha256": sha256_file(self.directory / name)})
        self.rows = []


def _strings(name: str, values) -> dict:
    """UTF-8 strings as one uint8 tensor and their offsets (safetensors holds tensors only)."""
    data = [v.encode("utf-8") for v in values]
    return {
        f"{name}_bytes": torch.from_numpy(np.frombuffer(b"".join(data), dtype=np.uint8).copy()),
        f"{name}_offsets": torch.tensor(np.cumsum([0] + [len(b) for b in data]), dtype=torch.int64),
    }


def teacher_images(family, ids: list[list[int]], keys: list[str], settings: dict) -> list[np.ndarray]:
    """The dense model's own samples for captions (``teacher``), one seed per record key."""
    from PIL import Image

    seeds = [int.from_bytes(hashlib.sha256(f"{settings['seed']}:{k}".encode()).digest()[:4], "little") for k in keys]
    with torch.no_grad():
        images = family.generate_images(
            ids, seeds, num_steps=settings["teacher_steps"], cfg_scale=settings["teacher_cfg_scale"]
        )
    out = []
    for key, image in zip(keys, images):
        pil = Image.fromarray((image.float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
        out.append(fit(pil, family.training_size, "upscale", key))
    return out


def prepare_tune_data(
    family,
    records,
    out_dir,
    settings: dict,
    prompts: dict[str, list[str]],
    skipped: Counter | None = None,
    inputs: list[dict] | None = None,
    progress: bool = True,
) -> dict:
    """Encode ``records`` (``sources.Record``) into ``out_dir``; returns the manifest.

    ``prompts``: ``{benchmark: [prompt, ...]}`` the captions are checked against; ``skipped``: the
    reader's counter of unpaired members (merged into the manifest); ``inputs``: what the raw files
    were (name, bytes, sha256), recorded as provenance. Refuses (nothing written) on an image below the
    training resolution under ``small_images: refuse``, and on contamination past the limits."""
    s = check_settings(settings)
    if s["source"] == "shapes":
        raise ValueError("tune data source 'shapes' has no prepare stage: tuning draws the shapes world")
    skipped = skipped if skipped is not None else Counter()
    size = tuple(family.training_size)
    check = ContaminationCheck(prompts, s["contamination"])
    out_dir = Path(out_dir)
    family.eval()
    with atomic_path(out_dir, is_dir=True) as tmp:
        writer = ShardWriter(tmp, s["shard_size"], STORAGE_DTYPES[s["latent_dtype"]])
        pending: list[tuple] = []

        def encode(batch):
            keys = [r.key for r, _, _ in batch]
            ids = [i for _, i, _ in batch]
            images = [im for _, _, im in batch]
            if images[0] is None:
                images = teacher_images(family, ids, keys, s)
            with torch.no_grad():
                mean, std = family.latent_moments(torch.from_numpy(np.stack(images)))
            for (record, row_ids, _), m, d in zip(batch, mean.float().cpu(), std.float().cpu()):
                writer.add(record.key, record.caption, row_ids, m, d)

        bar = tqdm(records, desc="prepare tuning data", unit="image", disable=not progress, mininterval=2.0)
        kept = 0
        for record in bar:
            if s["max_samples"] is not None and kept >= s["max_samples"]:
                break
            image = None
            if record.image is not None:
                image = fit(decode_image(record.image, record.key), size, s["small_images"], record.key)
                if image is None:
                    skipped["small"] += 1
                    continue
            check.add(record.key, record.caption)
            try:
                ids = family.encode(record.caption)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{record.key}: the model's tokenizer cannot encode its caption ({e})") from None
            pending.append((record, ids, image))
            kept += 1
            if len(pending) == s["batch_size"]:
                encode(pending)
                pending = []
        if pending:
            encode(pending)
        writer.flush()
        check.verdict()
        if kept == 0:
            raise ValueError(f"no tuning examples were read (skipped: {dict(skipped)})")
        mean_shape = list(family.noise_shape(1)[1:])
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "source": s["source"],
            "settings": s,
            "count": kept,
            "skipped": dict(skipped),
            "family": family.name,
            "training_size": list(size),
            "latent_shape": mean_shape,
            "latent_dtype": s["latent_dtype"],
            "posterior": writer.any_std,
            "codec": {"sha256": family.codec_digest(), "dtype": str(family.dtype).replace("torch.", "")},
            "contamination": check.report(),
            "inputs": inputs or [],
            "shards": writer.shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info(
        "prepared %d tuning examples in %d shards -> %s (skipped %s; contamination: %d exact, %d near)",
        kept,
        len(writer.shards),
        out_dir,
        dict(skipped),
        check.counts["exact"],
        check.counts["near"],
    )
    return manifest


__all__ = ["LATENT_TARGETS", "MANIFEST", "PREPARE_DEFAULTS", "check_settings", "prepare_tune_data"]
