"""Raw tuning data in the real layouts, small: WebDataset tars (``<key>.jpg`` + ``<key>.json`` with the
caption under ``prompt``, as text-to-image-2M), BAGEL's T2I parquet (``image`` bytes, ``captions`` a
JSON object) and caption files; the images are smooth random gradients with a few shapes, so a codec
has something to reconstruct."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

CAPTIONS = [
    "a red square above a blue circle on a grey floor",
    "two green triangles beside a yellow disc at dusk",
    "a purple ring resting on a white table near a window",
    "an orange star floating over calm dark water",
    "three small cyan cubes stacked on a wooden shelf",
    "a pink ellipse leaning against a brown wall in the sun",
    "a black arrow pointing at a silver sphere in fog",
    "a teal hexagon in the middle of a sandy beach",
]
#: captions in the shapes world's vocabulary (the tiny MoT's tokenizer)
SHAPES_CAPTIONS = [
    "a purple tee and a pink square",
    "a lime tee",
    "a square and a cross",
    "a hook and a ring",
    "an azure hook",
    "a red tee and a lime spool",
    "an azure triangle",
    "a pink ring",
]


def picture(seed: int, size=(48, 40)) -> np.ndarray:
    """uint8 [H, W, 3]: a colour gradient with a bright rectangle (``size`` = (W, H))."""
    rng = np.random.default_rng(seed)
    W, H = size
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    image = a[None, None] * x[..., None] + b[None, None] * (1 - y[..., None])
    x0, y0 = rng.integers(0, W // 2), rng.integers(0, H // 2)
    image[y0 : y0 + H // 3, x0 : x0 + W // 3] = rng.uniform(0.5, 1, 3)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def encoded(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, captions=CAPTIONS, size=(48, 40), seed: int = 0, extra=()) -> Path:
    """A WebDataset tar of one image per caption; ``extra``: (name, bytes) members added as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            key = f"{seed:03d}{i:06d}"
            _add(tar, f"{key}.jpg", encoded(picture(seed * 1000 + i, size)))
            _add(tar, f"{key}.json", json.dumps({"prompt": caption, "width": size[0], "height": size[1]}).encode())
        for name, data in extra:
            _add(tar, name, data)
    return path


def write_parquet(path: Path, captions=CAPTIONS, size=(48, 40), seed: int = 0, variants=None) -> Path:
    """BAGEL's T2I parquet: ``image`` (PNG bytes), ``captions`` (JSON object of captions: the given one
    and, per ``variants`` {name: caption -> caption}, more; default one long variant)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [encoded(picture(seed * 1000 + i, size), "PNG") for i in range(len(captions))]
    variants = {"long": lambda c: f"{c}, photographed in soft light"} if variants is None else variants
    caps = [json.dumps({"short": c, **{k: f(c) for k, f in variants.items()}}) for c in captions]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "captions": pa.array(caps, pa.string())}), path)
    return path


def prepare_argv(model, raw, settings: dict, out) -> tuple:
    """The ``prepare-tune-data`` command line of ``model`` on the raw files ``raw``."""
    return ("prepare-tune-data", model, "--source-dir", raw, "--settings", json.dumps(settings), "--out", out)


def import_fake_bagel(root: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A BAGEL-layout checkpoint (FLUX AE, byte-level Qwen2-style tokenizer) imported strictly into
    ``root/dense<seed>`` at ``image_size`` pixels; the model directory."""
    from helpers.cli import cli
    from unisparse.models.bagel import write_fake_checkpoint

    write_fake_checkpoint(root / f"src{seed}", sizes={"image_size": image_size}, seed=seed)
    cli("import-bagel", "--src", root / f"src{seed}", "--out", root / f"dense{seed}", "--dtype", "float32",
        "--image-size", str(image_size), "--vit-image-size", "28")  # fmt: skip
    return root / f"dense{seed}"
