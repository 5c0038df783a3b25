"""SigLIP NaViT vision tower: SigLIP's math and names, per-image attention when packed, BAGEL's layout."""

import pytest
import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from unisparse.models.modeling_mot import patchify
from unisparse.models.siglip_navit import (
    SIGLIP_NAVIT_DEFAULTS,
    SiglipNaViT,
    conv_patch_weight_to_linear,
    navit_position_ids,
)

TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=4,
    max_num_patch_per_side=8,
)
P, S, C = 4, 8, 3


def make_tower(seed=0, **overrides):
    torch.manual_seed(seed)
    tower = SiglipNaViT({**TINY, **overrides}).eval()
    with torch.no_grad():  # non-trivial norms and biases so every weight matters
        for p in tower.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return tower


def encode_one(tower, image):
    """One [H, W, C] image alone through the tower."""
    h, w = image.shape[0] // P, image.shape[1] // P
    patches = patchify(image[None], P)[0]
    return tower(patches, navit_position_ids(h, w, S), [h * w])


def test_equals_transformers_siglip_vision_model_on_full_grid():
    tower = make_tower()
    hf_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_channels=C,
        image_size=S * P,
        patch_size=P,
        vision_use_head=False,
    )
    hf = SiglipVisionModel(hf_config).eval()
    ours = tower.state_dict()
    theirs = {}
    for name, value in ours.items():
        name = name.removeprefix("vision_model.")
        if name == "embeddings.patch_embedding.weight":  # Linear [D, p*p*C] (ph, pw, c) -> Conv2d [D, C, p, p]
            value = value.reshape(-1, P, P, C).permute(0, 3, 1, 2)
        theirs[name] = value
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)

    torch.manual_seed(1)
    image = torch.randn(S * P, S * P, C)
    with torch.no_grad():
        expected = hf(pixel_values=image.permute(2, 0, 1)[None]).last_hidden_state[0]
        got = encode_one(tower, image)
    assert got.shape == (S * S, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_packed_images_match_each_alone():
    tower = make_tower()
    torch.manual_seed(2)
    images = [torch.randn(3 * P, 5 * P, C), torch.randn(6 * P, 4 * P, C), torch.randn(2 * P, 2 * P, C)]
    grids = [(im.shape[0] // P, im.shape[1] // P) for im in images]
    patches = torch.cat([patchify(im[None], P)[0] for im in images])
    position_ids = torch.cat([navit_position_ids(h, w, S) for h, w in grids])
    seqlens = [h * w for h, w in grids]
    with torch.no_grad():
        alone = torch.cat([encode_one(tower, im) for im in images])
        packed_list = tower(patches, position_ids, seqlens)
        packed_tensor = tower(patches, position_ids, torch.tensor(seqlens))
    torch.testing.assert_close(packed_list, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_tensor, alone, atol=1e-5, rtol=1e-5)

    # equal-size images take the unmasked batch path; still no leakage between them
    same = [torch.randn(4 * P, 3 * P, C), torch.randn(4 * P, 3 * P, C)]
    with torch.no_grad():
        alone = torch.cat([encode_one(tower, im) for im in same])
        packed = tower(
            patchify(torch.stack(same), P).flatten(0, 1), navit_position_ids(4, 3, S).repeat(2), torch.tensor([12, 12])
        )
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_patch_layout_and_linear_equals_conv():
    torch.manual_seed(3)
    conv = nn.Conv2d(C, 32, kernel_size=P, stride=P)
    image = torch.randn(2, 3 * P, 5 * P, C)
    patches = patchify(image, P)
    # (row, col) major, then (ph, pw, c) inside a patch: BAGEL's "chpwq->hwpqc"
    row, col, i, j, c = 2, 3, 1, 3, 2
    assert patches[1, row * 5 + col, (i * P + j) * C + c] == image[1, row * P + i, col * P + j, c]
    weight = conv_patch_weight_to_linear(conv.weight)
    assert weight.shape == (32, P * P * C)
    assert weight[7, (i * P + j) * C + c] == conv.weight[7, c, i, j]
    torch.testing.assert_close(SiglipNaViT.conv_to_linear_weight(conv.weight), weight)

    linear = nn.Linear(P * P * C, 32)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(conv.bias)
        expected = conv(image.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(linear(patches), expected, atol=1e-5, rtol=1e-5)

    assert navit_position_ids(2, 3, 8).tolist() == [0, 1, 2, 8, 9, 10]
    with pytest.raises(ValueError):
        navit_position_ids(9, 1, 8)


def expected_bagel_names(num_layers):
    """BAGEL's ViT names (modeling/bagel/siglip_navit.py after convert_conv2d_to_linear, rope off)."""
    pre = "vit_model.vision_model."
    names = [
        pre + "embeddings.patch_embedding.weight",
        pre + "embeddings.patch_embedding.bias",
        pre + "embeddings.position_embedding.weight",
        pre + "post_layernorm.weight",
        pre + "post_layernorm.bias",
    ]
    for i in range(num_layers):
        for sub in (
            "layer_norm1",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ):
            names += [f"{pre}encoder.layers.{i}.{sub}.weight", f"{pre}encoder.layers.{i}.{sub}.bias"]
    return sorted(names)


def closed_form_count(hidden, inter, layers, patch, channels, max_side):
    per_layer = 4 * hidden * hidden + 2 * hidden * inter + 9 * hidden + inter  # 4 attn linears+bias, fc1, fc2, 2 LN
    return hidden * (patch * patch * channels + 1) + max_side**2 * hidden + layers * per_layer + 2 * hidden


def test_names_and_parameter_count_match_bagel():
    holder = nn.Module()
    holder.vit_model = make_tower()
    sd = holder.state_dict()
    assert sorted(sd) == expected_bagel_names(2)
    assert list(holder.buffers()) == []
    assert sd["vit_model.vision_model.embeddings.patch_embedding.weight"].shape == (32, P * P * C)
    assert sd["vit_model.vision_model.embeddings.position_embedding.weight"].shape == (S * S, 32)

    with torch.device("meta"):
        holder.vit_model = SiglipNaViT()
    assert sorted(holder.state_dict()) == expected_bagel_names(26)
    shapes = {k: tuple(v.shape) for k, v in holder.state_dict().items()}
    assert shapes["vit_model.vision_model.embeddings.patch_embedding.weight"] == (1152, 14 * 14 * 3)
    assert shapes["vit_model.vision_model.embeddings.position_embedding.weight"] == (4900, 1152)
    assert shapes["vit_model.vision_model.encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    counted = sum(p.numel() for p in holder.parameters())
    d = SIGLIP_NAVIT_DEFAULTS
    formula = closed_form_count(
        d["hidden_size"],
        d["intermediate_size"],
        d["num_hidden_layers"],
        d["patch_size"],
        d["num_channels"],
        d["max_num_patch_per_side"],
    )
    assert counted == formula == 402_552_736


def test_bad_config_and_bf16():
    with pytest.raises(ValueError, match="unknown SigLIP NaViT config keys"):
        SiglipNaViT({**TINY, "image_size": 980})
    with pytest.raises(ValueError, match="divisible"):
        SiglipNaViT({**TINY, "num_attention_heads": 3})

    tower = make_tower()
    torch.manual_seed(4)
    images = [torch.randn(3 * P, 5 * P, C), torch.randn(2 * P, 2 * P, C)]
    patches = torch.cat([patchify(im[None], P)[0] for im in images])
    position_ids = torch.cat([navit_position_ids(3, 5, S), navit_position_ids(2, 2, S)])
    with torch.no_grad():
        ref = tower(patches, position_ids, [15, 4])
        out = tower.to(torch.bfloat16)(patches, position_ids, [15, 4])  # fp32 pixels are cast to the weights
    assert out.dtype == torch.bfloat16 and out.shape == (19, 32)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError):
        tower(patches, position_ids, [15, 3])
