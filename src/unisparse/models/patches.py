"""Images <-> patch tokens in BAGEL's layout, shared by the MoT (ViT and latent patches) and the FLUX
codec."""

from __future__ import annotations


def patchify(images, patch: int):
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]: patches in row-major order, each in (ph, pw, c) order (the
    layout of BAGEL's Linear ViT patch embedding and of its latent patches)."""
    B, H, W, C = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch}")
    x = images.reshape(B, H // patch, patch, W // patch, patch, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens, patch: int, grid, channels: int):
    """Inverse of ``patchify``: [B, h*w, p*p*C] -> [B, h*p, w*p, C]; ``grid`` is h = w or (h, w)."""
    B = tokens.shape[0]
    h, w = (grid, grid) if isinstance(grid, int) else grid
    x = tokens.reshape(B, h, w, patch, patch, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * patch, w * patch, channels)
