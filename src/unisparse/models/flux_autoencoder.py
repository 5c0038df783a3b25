"""The FLUX.1 autoencoder, as BAGEL-7B-MoT uses it, and its codec interface for the MoT.

BAGEL turns images into latent tokens with the FLUX.1 VAE (16 latent channels, downsample 8) and
2x2 latent patches. The modules below reproduce that network with exactly the parameter names of
FLUX's ``ae.safetensors`` (``encoder.down.{i}.block.{j}.conv1.weight``, ...), so a strict
``load_state_dict`` of that file (under whatever prefix the owner puts this module) fills every
parameter and nothing else: there are no extra parameters and no persistent buffers.

``FluxAutoEncoder`` is the plain autoencoder (images in [-1, 1], channels first, scaled latents).
``FluxCodec`` wraps it in the MoT's codec interface (``encode(images) -> tokens``,
``decode(tokens) -> images``), the drop-in replacement for ``IdentityCodec``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .patches import patchify, unpatchify

#: FLUX.1 AE sizes as BAGEL's ``load_ae`` sets them. ``downsample`` is not a key: it follows from
#: ``ch_mult`` (see ``FluxAutoEncoder.downsample``).
FLUX_AE_DEFAULTS = {
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 16,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}

#: FLUX hard-codes 32 groups in every GroupNorm, so every width must be a multiple of 32.
_NUM_GROUPS = 32


def resolve_ae_sizes(sizes: dict | None) -> dict:
    """Merge ``sizes`` over ``FLUX_AE_DEFAULTS``; reject unknown keys and widths GroupNorm can't split."""
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(FLUX_AE_DEFAULTS))
    if unknown:
        hint = " (downsample is derived: 2**(len(ch_mult)-1))" if "downsample" in unknown else ""
        raise ValueError(
            f"unknown FLUX autoencoder size key(s) {unknown}{hint}; known keys: {sorted(FLUX_AE_DEFAULTS)}"
        )
    merged = {**FLUX_AE_DEFAULTS, **sizes}
    merged["ch_mult"] = [int(m) for m in merged["ch_mult"]]
    if not merged["ch_mult"]:
        raise ValueError("FLUX autoencoder ch_mult must not be empty")
    for m in merged["ch_mult"]:
        if (merged["ch"] * m) % _NUM_GROUPS:
            raise ValueError(
                f"FLUX autoencoder width ch*ch_mult = {merged['ch']}*{m} is not a multiple of "
                f"{_NUM_GROUPS} (GroupNorm uses {_NUM_GROUPS} groups)"
            )
    return merged


class GroupNorm32(nn.GroupNorm):
    """FLUX's GroupNorm (32 groups, eps 1e-6), computed in fp32 so bf16 weights keep accurate statistics.

    Same parameters (``weight``, ``bias``) as ``nn.GroupNorm``; the output returns to the input dtype.
    """

    def __init__(self, num_channels: int):
        super().__init__(num_groups=_NUM_GROUPS, num_channels=num_channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class FluxAttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1 convs as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = GroupNorm32(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W positions, C] in raster order
        q, k, v = (proj(hn).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class FluxResnetBlock(nn.Module):
    """Pre-norm residual block (norm, swish, 3x3 conv) x 2; a 1x1 ``nin_shortcut`` only when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = GroupNorm32(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = GroupNorm32(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = None  # registers no parameter, so the name is absent as in FLUX

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class FluxDownsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom by one (FLUX's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class FluxUpsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class FluxMidBlock(nn.Module):
    """``block_1`` -> ``attn_1`` -> ``block_2`` at the lowest resolution (a plain container in FLUX)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = FluxResnetBlock(channels, channels)
        self.attn_1 = FluxAttnBlock(channels)
        self.block_2 = FluxResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class FluxLevel(nn.Module):
    """One resolution level: ``block`` (a list of res blocks) and an optional ``downsample``/``upsample``.

    FLUX's levels also carry an empty ``attn`` list; it has no parameters, so it is left out here.
    """

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class FluxEncoder(nn.Module):
    """Image [B, in_channels, H, W] -> Gaussian moments [B, 2*z_channels, H/d, W/d] (mean, then log-variance)."""

    def __init__(self, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(FluxResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            last = i == len(ch_mult) - 1
            self.down.append(FluxLevel(blocks, None if last else FluxDownsample(block_in), "downsample"))
        self.mid = FluxMidBlock(block_in)
        self.norm_out = GroupNorm32(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxDecoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*d, w*d].

    ``up`` is indexed by resolution like the encoder's ``down`` (``up.0`` is the full-resolution,
    last-run level), so it runs in reverse index order; each level has ``num_res_blocks + 1`` blocks.
    """

    def __init__(self, out_ch: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = FluxMidBlock(block_in)
        levels: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(FluxResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
            levels.append(FluxLevel(blocks, FluxUpsample(block_in) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = GroupNorm32(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxAutoEncoder(nn.Module):
    """FLUX.1 VAE: ``encode`` gives the scaled latent ``scale * (z - shift)``, ``decode`` inverts it.

    ``sizes`` is merged over ``FLUX_AE_DEFAULTS``. Scale and shift are plain floats, not buffers,
    because ``ae.safetensors`` stores neither.
    """

    def __init__(self, sizes: dict | None = None):
        super().__init__()
        s = resolve_ae_sizes(sizes)
        self.sizes = s
        self.z_channels = s["z_channels"]
        self.scale_factor = float(s["scale_factor"])
        self.shift_factor = float(s["shift_factor"])
        self.encoder = FluxEncoder(s["in_channels"], s["ch"], s["ch_mult"], s["num_res_blocks"], s["z_channels"])
        self.decoder = FluxDecoder(s["out_ch"], s["ch"], s["ch_mult"], s["num_res_blocks"], s["z_channels"])

    @property
    def downsample(self) -> int:
        """Spatial reduction of the latent: one factor 2 per level except the last."""
        return 2 ** (len(self.sizes["ch_mult"]) - 1)

    @property
    def _param(self) -> torch.Tensor:
        return self.encoder.conv_in.weight

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> scaled latent [B, z, H/d, W/d] in the parameters' dtype.

        The Gaussian's mean by default (deterministic inference); ``sample=True`` or a ``generator``
        draws ``mean + std * noise`` as BAGEL's training does.
        """
        p = self._param
        moments = self.encoder(x.to(device=p.device, dtype=p.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample or generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent [B, z, h, w] -> image [B, out_ch, h*d, w*d] in about [-1, 1] (not clamped)."""
        p = self._param
        z = z.to(device=p.device, dtype=p.dtype) / self.scale_factor + self.shift_factor
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def patchify_latent(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, h*p, w*p] -> [B, h*w, p*p*C]: raster-ordered rows, each patch flattened as (ph, pw, c),
    the MoT's ``patchify`` on the channels-last latent (the order of BAGEL's ``einsum("chpwq->hwpqc")``)."""
    return patchify(latent.permute(0, 2, 3, 1), patch)


def unpatchify_latent(tokens: torch.Tensor, patch: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of ``patchify_latent``: [B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
    return unpatchify(tokens, patch, grid, channels).permute(0, 3, 1, 2)


class FluxCodec(FluxAutoEncoder):
    """The MoT's codec backed by the FLUX AE: images [B, H, W, C] in [0, 1] <-> latent tokens.

    A token is one ``p x p`` patch of the 16-channel latent, flattened (ph, pw, c) as in BAGEL, so a
    token has ``p*p*z_channels`` (64) values. Tokens and images are returned in fp32 on the module's
    device whatever the parameters' dtype, because the MoT's flow loss and metrics work in fp32.
    """

    def __init__(self, config):
        super().__init__(getattr(config, "codec_config", None) or {})
        self.patch_size = int(config.latent_patch_size)
        if config.latent_channels != self.z_channels:
            raise ValueError(
                f"config.latent_channels={config.latent_channels} does not match the FLUX autoencoder's "
                f"z_channels={self.z_channels}"
            )
        if config.latent_downsample != self.downsample:
            raise ValueError(
                f"config.latent_downsample={config.latent_downsample} does not match the FLUX autoencoder's "
                f"downsample={self.downsample} (2**(len(ch_mult)-1) with ch_mult={self.sizes['ch_mult']})"
            )

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.z_channels

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[B, H, W, C] in [0, 1] -> tokens [B, (H/(d p)) * (W/(d p)), p*p*z] in fp32."""
        _, H, W, _ = images.shape
        stride = self.downsample * self.patch_size
        if H % stride or W % stride:
            raise ValueError(f"image size {H}x{W} is not a multiple of downsample*patch = {stride}")
        x = images.to(self._param.device).permute(0, 3, 1, 2) * 2.0 - 1.0
        latent = super().encode(x, sample=sample, generator=generator)
        return patchify_latent(latent.float(), self.patch_size)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled posterior's mean and standard deviation as tokens (fp32, [B, L, p*p*z] each): a
        training target drawn as ``mean + std * noise`` is exactly ``encode(images, sample=True)``
        with that noise (BAGEL's trainer samples the posterior; ``encode`` takes its mean)."""
        _, H, W, _ = images.shape
        stride = self.downsample * self.patch_size
        if H % stride or W % stride:
            raise ValueError(f"image size {H}x{W} is not a multiple of downsample*patch = {stride}")
        p = self._param
        x = images.to(p.device).permute(0, 3, 1, 2) * 2.0 - 1.0
        mean, logvar = self.encoder(x.to(dtype=p.dtype)).chunk(2, dim=1)
        mean = self.scale_factor * (mean.float() - self.shift_factor)
        std = self.scale_factor * torch.exp(0.5 * logvar.float())
        return patchify_latent(mean, self.patch_size), patchify_latent(std, self.patch_size)

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens [B, L, p*p*z] -> images [B, H, W, C] in [0, 1], fp32, clamped.

        ``grid=(h, w)`` gives the token grid; without it the grid must be square (L a perfect square).
        """
        L, D = tokens.shape[1], tokens.shape[2]
        if D != self.token_dim:
            raise ValueError(f"token dim {D} != p*p*z_channels = {self.token_dim}")
        if grid is None:
            side = math.isqrt(L)
            if side * side != L:
                raise ValueError(f"{L} tokens do not form a square grid; pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] != L:
            raise ValueError(f"grid {tuple(grid)} does not hold {L} tokens")
        latent = unpatchify_latent(tokens, self.patch_size, grid, self.z_channels)
        img = super().decode(latent).float()
        return ((img + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)
