"""The FLUX autoencoder codec: FLUX's exact weight names, BAGEL's latent patch order, scale/shift."""

from types import SimpleNamespace

import pytest
import torch

from unisparse.models.flux_autoencoder import (
    FLUX_AE_DEFAULTS,
    FluxAutoEncoder,
    FluxCodec,
    patchify_latent,
    unpatchify_latent,
)

SMALL = {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1}  # downsample 8, widths 32/64

#: FLUX.1 ae.safetensors: encoder 34,274,208 + decoder 49,545,475 (closed form below)
FLUX_AE_NUM_PARAMS = 83_819_683


def flux_ae_param_shapes(ch, ch_mult, num_res_blocks, z_channels, in_channels=3, out_ch=3):
    """FLUX's naming rule, written from ae.safetensors' layout independently of the module: name -> shape."""
    out = {}

    def conv(name, cin, cout, k):
        out[f"{name}.weight"] = (cout, cin, k, k)
        out[f"{name}.bias"] = (cout,)

    def norm(name, c):
        out[f"{name}.weight"] = (c,)
        out[f"{name}.bias"] = (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(name, c):
        resblock(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{proj}", c, c, 1)
        resblock(f"{name}.block_2", c, c)

    n = len(ch_mult)
    widths = [ch * m for m in ch_mult]
    # encoder: level i takes the previous level's width (ch before level 0)
    conv("encoder.conv_in", in_channels, ch, 3)
    for i in range(n):
        cin = ch if i == 0 else widths[i - 1]
        for j in range(num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", cin if j == 0 else widths[i], widths[i])
        if i < n - 1:
            conv(f"encoder.down.{i}.downsample.conv", widths[i], widths[i], 3)
    mid("encoder.mid", widths[-1])
    norm("encoder.norm_out", widths[-1])
    conv("encoder.conv_out", widths[-1], 2 * z_channels, 3)
    # decoder: up.{i} has width widths[i] and receives the width of level i+1 (run deepest first)
    conv("decoder.conv_in", z_channels, widths[-1], 3)
    mid("decoder.mid", widths[-1])
    for i in range(n):
        cin = widths[i + 1] if i < n - 1 else widths[-1]
        for j in range(num_res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", cin if j == 0 else widths[i], widths[i])
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", widths[i], widths[i], 3)
    norm("decoder.norm_out", widths[0])
    conv("decoder.conv_out", widths[0], out_ch, 3)
    return out


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def codec_config(**overrides):
    cfg = dict(codec_config=dict(SMALL), latent_patch_size=2, latent_channels=16, latent_downsample=8)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return FluxCodec(codec_config()).eval()


def test_weight_names_and_shapes_follow_flux():
    for sizes in (SMALL, {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2, "z_channels": 4}):
        ae = FluxAutoEncoder(sizes)
        s = {**FLUX_AE_DEFAULTS, **sizes}
        expected = flux_ae_param_shapes(s["ch"], s["ch_mult"], s["num_res_blocks"], s["z_channels"])
        got = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
        assert got == expected
        assert list(ae.buffers()) == []
        # a strict load of a FLUX-named state dict fills it exactly
        ae.load_state_dict({k: torch.zeros(v) for k, v in expected.items()}, strict=True)
        assert ae.downsample == 2 ** (len(s["ch_mult"]) - 1)


def test_default_sizes_have_flux_parameter_count():
    s = FLUX_AE_DEFAULTS
    shapes = flux_ae_param_shapes(s["ch"], s["ch_mult"], s["num_res_blocks"], s["z_channels"])
    closed_form = sum(numel(v) for v in shapes.values())
    assert closed_form == FLUX_AE_NUM_PARAMS
    with torch.device("meta"):
        ae = FluxAutoEncoder()
    assert sum(p.numel() for p in ae.parameters()) == FLUX_AE_NUM_PARAMS
    assert sum(p.numel() for p in ae.encoder.parameters()) == 34_274_208
    assert ae.downsample == 8 and ae.z_channels == 16


def test_encode_decode_shapes_non_square(codec):
    images = torch.rand(2, 32, 48, 3)
    tokens = codec.encode(images)
    assert tokens.shape == (2, (32 // 16) * (48 // 16), 2 * 2 * 16)
    assert tokens.dtype == torch.float32
    out = codec.decode(tokens, grid=(2, 3))
    assert out.shape == (2, 32, 48, 3) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    square = codec.decode(torch.randn(1, 4, 64))
    assert square.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="square"):
        codec.decode(tokens)  # 6 tokens, no grid
    with pytest.raises(ValueError, match="multiple"):
        codec.encode(torch.rand(1, 24, 32, 3))


def test_patch_order_matches_bagel():
    p, c, h, w = 2, 16, 3, 5
    latent = torch.arange(c * h * p * w * p, dtype=torch.float32).reshape(1, c, h * p, w * p)
    tokens = patchify_latent(latent, p)
    # BAGEL bagel.py: latent[:, :h*p, :w*p].reshape(c, h, p, w, p); einsum("chpwq->hwpqc").reshape(-1, p*p*c)
    bagel = torch.einsum("chpwq->hwpqc", latent[0].reshape(c, h, p, w, p)).reshape(-1, p * p * c)
    assert torch.equal(tokens[0], bagel)
    # spot check: token (row 1, col 2), entry (ph 1, pw 0, channel 3)
    assert tokens[0, 1 * w + 2, (1 * p + 0) * c + 3] == latent[0, 3, 1 * p + 1, 2 * p + 0]
    assert torch.equal(unpatchify_latent(tokens, p, (h, w), c), latent)
    # BAGEL's unpatchify (inferencer): (h, w, p, q, c) -> (c, h*p, w*q)
    back = torch.einsum("nhwpqc->nchpwq", bagel.reshape(1, h, w, p, p, c)).reshape(1, c, h * p, w * p)
    assert torch.equal(back, latent)


def test_codec_uses_bagel_patch_order(codec):
    images = torch.rand(1, 32, 48, 3)
    with torch.no_grad():
        latent = FluxAutoEncoder.encode(codec, images.permute(0, 3, 1, 2) * 2 - 1)
        tokens = codec.encode(images)
    c, (H, W) = latent.shape[1], latent.shape[2:]
    bagel = torch.einsum("chpwq->hwpqc", latent[0].reshape(c, H // 2, 2, W // 2, 2)).reshape(-1, 4 * c)
    assert torch.equal(tokens[0], bagel)


def test_scale_and_shift_cancel():
    torch.manual_seed(1)
    codec = FluxCodec(codec_config()).eval()
    with torch.no_grad():
        # perturb norms/biases so the check exercises non-trivial weights
        for p in codec.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        x = torch.rand(1, 3, 32, 48) * 2 - 1
        mean = codec.encoder(x).chunk(2, dim=1)[0]
        raw = codec.decoder(mean)
        z = FluxAutoEncoder.encode(codec, x)
        assert torch.allclose(z, codec.scale_factor * (mean - codec.shift_factor), atol=1e-6)
        assert torch.allclose(FluxAutoEncoder.decode(codec, z), raw, atol=1e-5, rtol=0)
        # through the codec: [0, 1] images and tokens
        images = (x.permute(0, 2, 3, 1) + 1) / 2
        out = codec.decode(codec.encode(images), grid=(2, 3))
        expected = ((raw + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        assert torch.allclose(out, expected, atol=1e-5, rtol=0)


def test_sampling_uses_generator(codec):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = FluxAutoEncoder.encode(codec, x, generator=torch.Generator().manual_seed(3))
        b = FluxAutoEncoder.encode(codec, x, generator=torch.Generator().manual_seed(3))
        m = FluxAutoEncoder.encode(codec, x)
    assert torch.equal(a, b) and not torch.equal(a, m)


def test_config_mismatches_raise():
    with pytest.raises(ValueError, match=r"latent_channels=4.*z_channels=16"):
        FluxCodec(codec_config(latent_channels=4))
    with pytest.raises(ValueError, match=r"latent_downsample=16.*downsample=8"):
        FluxCodec(codec_config(latent_downsample=16))
    with pytest.raises(ValueError, match=r"unknown FLUX autoencoder size key.*'chanels'"):
        FluxCodec(codec_config(codec_config={**SMALL, "chanels": 3}))
    with pytest.raises(ValueError, match="downsample is derived"):
        FluxAutoEncoder({"downsample": 8})
    with pytest.raises(ValueError, match="multiple of 32"):
        FluxAutoEncoder({"ch": 16})


def test_empty_codec_config_means_flux_defaults():
    with torch.device("meta"):
        codec = FluxCodec(codec_config(codec_config={}))
    assert codec.sizes == FLUX_AE_DEFAULTS and codec.token_dim == 64


def test_bf16_codec_outputs_fp32():
    torch.manual_seed(0)
    codec = FluxCodec(codec_config()).to(torch.bfloat16).eval()
    images = torch.rand(1, 32, 32, 3)
    with torch.no_grad():
        tokens = codec.encode(images)
        out = codec.decode(tokens)
    assert tokens.dtype == torch.float32 and out.dtype == torch.float32
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(tokens).all() and torch.isfinite(out).all()
