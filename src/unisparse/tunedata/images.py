"""Decode an image and bring it to the training resolution: resize so it covers the target (aspect
kept), then centre-crop. An image smaller than the target is refused, skipped or upscaled as the
``small_images`` policy says; it is never silently stretched."""

from __future__ import annotations

import io

import numpy as np


class SmallImageError(ValueError):
    """An image below the training resolution under the ``refuse`` policy."""


def decode_image(data: bytes, where: str) -> "Image.Image":  # noqa: F821
    """Encoded bytes -> an RGB PIL image (EXIF orientation applied)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable image ({e})") from None


def fit(image, size: tuple[int, int], policy: str, where: str) -> np.ndarray | None:
    """``image`` (PIL, RGB) as float32 [H, W, 3] in [0, 1] at ``size`` = (H, W); None when ``policy``
    is ``skip`` and the image is smaller than ``size``."""
    from PIL import Image

    H, W = size
    w, h = image.size
    scale = max(H / h, W / w)
    if scale > 1.0:
        if policy == "refuse":
            raise SmallImageError(
                f"{where}: {w}x{h} pixels is smaller than the training resolution {W}x{H} "
                "(set tune data small_images to skip or upscale to allow it)"
            )
        if policy == "skip":
            return None
    new = (max(W, round(w * scale)), max(H, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new[0] - W) // 2, (new[1] - H) // 2
    image = image.crop((left, top, left + W, top + H))
    return np.asarray(image, dtype=np.float32) / 255.0
