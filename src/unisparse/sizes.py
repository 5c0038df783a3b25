"""Size rules shared by the model, the algorithms and the config checks (pure Python, no torch).

Kept apart so that Snakemake can check a config against the same rules the library applies without
importing torch or transformers (seconds per DAG build).
"""

from __future__ import annotations

#: BAGEL's image sides at inference: generated 1024 x 1024 (64 x 64 latent tokens), understood at most
#: 980 (70 x 70); here, not in models/bagel.py, so the CLI's --help needs no torch
BAGEL_IMAGE_SIZE, BAGEL_VIT_IMAGE_SIZE = 1024, 980
#: BAGEL's latent geometry: the FLUX autoencoder downsamples 8x, the MoT packs 2 x 2 latent patches
BAGEL_LATENT_PATCH_SIZE, BAGEL_LATENT_DOWNSAMPLE = 2, 8
#: geometry defaults of the MoT config (MoTConfig's signature uses these)
GEOMETRY_DEFAULTS = dict(vit_patch_size=4, latent_patch_size=4, latent_downsample=1)


def check_model_sizes(
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    image_size: int,
    vit_patch_size: int,
    latent_patch_size: int,
    latent_downsample: int,
    vit_image_size: int | None = None,
) -> None:
    """Raise ValueError, naming the field, for sizes no MoT can have. ``vit_image_size``: the side of an
    understanding image when it differs from a generated one (BAGEL: 980 for the ViT, 1024 generated)."""
    if num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
    if num_key_value_heads < 1 or num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} must be a multiple of num_key_value_heads={num_key_value_heads}"
        )
    if (vit_image_size or image_size) % vit_patch_size:
        name = "vit_image_size" if vit_image_size else "image_size"
        raise ValueError(f"{name}={vit_image_size or image_size} must be divisible by vit_patch_size={vit_patch_size}")
    if image_size % (latent_downsample * latent_patch_size):
        raise ValueError(
            f"image_size={image_size} must be divisible by latent_downsample * latent_patch_size="
            f"{latent_downsample * latent_patch_size}"
        )


def moe_layers(num_layers: int, dense_layers) -> list[int]:
    """Layers to convert: all but ``dense_layers`` ("first_last" = the paper's choice, "none", or a list)."""
    if dense_layers == "first_last":
        keep = {0, num_layers - 1}
    elif dense_layers in (None, "none"):
        keep = set()
    elif isinstance(dense_layers, str):
        raise ValueError(f"dense_layers must be 'first_last', 'none' or a list of layers, got {dense_layers!r}")
    else:
        keep = {int(i) for i in dense_layers}
        outside = sorted(i for i in keep if not 0 <= i < num_layers)
        if outside:
            raise ValueError(f"dense layers {outside} do not exist: the model has layers 0..{num_layers - 1}")
    return [i for i in range(num_layers) if i not in keep]


def check_partition_sizes(width: int, num_experts: int, shared_size: int = 0) -> int:
    """Return the expert size, or raise a ValueError saying which size is wrong."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 0 <= shared_size < width:
        raise ValueError(f"shared_size must be in [0, {width}) for an MLP of width {width}, got {shared_size}")
    routed = width - shared_size
    if routed % num_experts:
        raise ValueError(
            f"num_experts={num_experts} does not divide the routed width {routed} "
            f"(MLP width {width} - shared_size {shared_size})"
        )
    return routed // num_experts
