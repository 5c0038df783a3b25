"""SigLIP NaViT: the vision tower of BAGEL-7B-MoT, as a pluggable part of the MoT.

SigLIP-so400m/14 run NaViT-style: images of different resolutions are cut into patches, packed
along one token axis and encoded together, each image attending only to its own patches. A patch
is embedded by a Linear over its (ph, pw, c) pixel vector (BAGEL converts SigLIP's Conv2d to this
Linear before loading, and the checkpoint stores the Linear) plus a learned position embedding
over a ``max_num_patch_per_side``² grid, indexed ``row * max_side + col`` whatever the image's
size (BAGEL's "extrapolate" ids). No rope.

Parameter names are BAGEL's under ``vit_model.``: ``vision_model.embeddings.patch_embedding``,
``vision_model.embeddings.position_embedding``, ``vision_model.encoder.layers.{i}.*`` and
``vision_model.post_layernorm``, so ``ema.safetensors`` loads strictly.

The encoder layers are transformers' own ``SiglipEncoderLayer``: in this transformers version
(5.x) its forward takes a 4-D additive attention mask, so a batch of padded images with a
key-padding mask gives exactly the block-diagonal attention of BAGEL's flash-attn varlen call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.models.siglip.configuration_siglip import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

SIGLIP_NAVIT_DEFAULTS: dict = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    # vit_config.json says 27; BAGEL drops the last layer and uses the penultimate one's output.
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "num_channels": 3,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
    "max_num_patch_per_side": 70,
}


def navit_position_ids(h_patches: int, w_patches: int, max_side: int, device=None) -> torch.Tensor:
    """Flattened position ids ``row * max_side + col`` [h*w] of one image's patches: a patch keeps
    its grid slot whatever the image's size, so a small image uses the top-left of the table."""
    if not (0 < h_patches <= max_side and 0 < w_patches <= max_side):
        raise ValueError(f"{h_patches}x{w_patches} patches do not fit a {max_side}x{max_side} position grid")
    rows = torch.arange(h_patches, device=device)
    cols = torch.arange(w_patches, device=device)
    return (rows[:, None] * max_side + cols[None, :]).flatten()


def conv_patch_weight_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """SigLIP's Conv2d patch weight [hidden, C, p, p] -> the Linear weight [hidden, p*p*C] that
    takes (ph, pw, c)-ordered patch vectors (the bias is unchanged)."""
    hidden = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(hidden, -1)


class SiglipNaViTEmbeddings(nn.Module):
    """Linear patch embedding plus a learned position embedding looked up by flattened grid id."""

    def __init__(self, config: SiglipVisionConfig, max_side: int):
        super().__init__()
        patch_dim = config.num_channels * config.patch_size**2
        self.patch_embedding = nn.Linear(patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(max_side**2, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        patches = patches.to(self.patch_embedding.weight.dtype)
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipNaViTEncoder(nn.Module):
    """A stack of transformers' ``SiglipEncoderLayer`` (names ``layers.{i}.*`` as BAGEL's)."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=attention_mask)
        return hidden_states


class SiglipNaViTTransformer(nn.Module):
    """Embeddings, encoder and post-layernorm: the ``vision_model`` of BAGEL's vision tower."""

    def __init__(self, config: SiglipVisionConfig, max_side: int):
        super().__init__()
        self.embeddings = SiglipNaViTEmbeddings(config, max_side)
        self.encoder = SiglipNaViTEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class SiglipNaViT(nn.Module):
    """BAGEL's SigLIP NaViT vision tower: packed variable-resolution patches -> [N, hidden].

    ``config`` is a dict of sizes merged over ``SIGLIP_NAVIT_DEFAULTS``; unknown keys raise, since a
    misspelt size would otherwise silently build a tower that cannot load the checkpoint.
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        config = dict(config or {})
        unknown = sorted(set(config) - set(SIGLIP_NAVIT_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown SigLIP NaViT config keys {unknown}; allowed: {sorted(SIGLIP_NAVIT_DEFAULTS)}")
        self.config = {**SIGLIP_NAVIT_DEFAULTS, **config}
        c = self.config
        if c["hidden_size"] % c["num_attention_heads"]:
            raise ValueError(
                f"hidden_size {c['hidden_size']} is not divisible by num_attention_heads {c['num_attention_heads']}"
            )
        self.patch_size = c["patch_size"]
        self.max_side = c["max_num_patch_per_side"]
        # The transformers config only feeds SiglipEncoderLayer; sdpa takes our additive mask.
        self.siglip_config = SiglipVisionConfig(
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_channels=c["num_channels"],
            image_size=self.max_side * self.patch_size,
            patch_size=self.patch_size,
            hidden_act=c["hidden_act"],
            layer_norm_eps=c["layer_norm_eps"],
            attention_dropout=0.0,
            vision_use_head=False,
            attn_implementation="sdpa",
        )
        self.vision_model = SiglipNaViTTransformer(self.siglip_config, self.max_side)

    @property
    def patch_dim(self) -> int:
        return self.config["num_channels"] * self.patch_size**2

    @staticmethod
    def conv_to_linear_weight(weight: torch.Tensor) -> torch.Tensor:
        """See ``conv_patch_weight_to_linear`` (for importing original SigLIP weights)."""
        return conv_patch_weight_to_linear(weight)

    def forward(
        self,
        patches: torch.Tensor,
        position_ids: torch.Tensor,
        seqlens: torch.Tensor | Sequence[int],
    ) -> torch.Tensor:
        """Encode packed images.

        patches [N, p*p*C] (images one after another), position_ids [N] (``navit_position_ids``),
        seqlens: tokens per image (1-D tensor or list, summing to N). Returns [N, hidden].
        """
        if patches.dim() != 2 or patches.shape[1] != self.patch_dim:
            raise ValueError(f"patches must be [N, {self.patch_dim}], got {tuple(patches.shape)}")
        N = patches.shape[0]
        if position_ids.shape != (N,):
            raise ValueError(f"position_ids must be [{N}], got {tuple(position_ids.shape)}")
        # One host read of the lengths per forward (BAGEL does the same for max_seqlen), none per layer.
        lengths = [int(s) for s in (seqlens.tolist() if torch.is_tensor(seqlens) else seqlens)]
        if sum(lengths) != N or min(lengths, default=0) <= 0:
            raise ValueError(f"seqlens {lengths} must be positive and sum to the {N} packed patches")

        hidden = self.vision_model.embeddings(patches, position_ids)  # [N, D]
        B, L, D = len(lengths), max(lengths), hidden.shape[-1]
        if all(n == L for n in lengths):
            # Equal-size images: a plain batch, no mask, so sdpa may pick its fastest kernel.
            hidden = self.vision_model.encoder(hidden.view(B, L, D), attention_mask=None).reshape(N, D)
        else:
            # Pad each image to L tokens and mask padded keys: per-image attention, i.e. block-diagonal.
            device = hidden.device
            lens = seqlens.to(device) if torch.is_tensor(seqlens) else torch.tensor(lengths, device=device)
            starts = torch.cumsum(lens, 0) - lens
            image_of_token = torch.repeat_interleave(torch.arange(B, device=device), lens, output_size=N)
            offset = torch.arange(N, device=device) - starts[image_of_token]
            slot = image_of_token * L + offset  # where each packed token sits in the [B*L] padded layout
            padded = hidden.new_zeros(B * L, D).index_copy(0, slot, hidden).view(B, L, D)
            valid = torch.arange(L, device=device)[None, :] < lens[:, None]  # [B, L]
            mask = torch.zeros(B, 1, 1, L, dtype=hidden.dtype, device=device)
            mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(hidden.dtype).min)
            hidden = self.vision_model.encoder(padded, attention_mask=mask).reshape(B * L, D)[slot]
        return self.vision_model.post_layernorm(hidden)
