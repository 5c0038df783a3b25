"""BAGEL-7B-MoT's layout: a fake written at tiny sizes loads strictly and behaves as the native model;
every way a checkpoint can differ from the layout fails with the key (or the trap) named."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unisparse.io import IntegrityError
from unisparse.models.bagel import (
    AE,
    EMA,
    LLM_CONFIG,
    PUBLISHED,
    VIT_CONFIG,
    load_bagel,
    published_config,
    write_fake_checkpoint,
)
from unisparse.models.loading import load_model
from unisparse.models.modeling_mot import MoTForUnifiedModel
from unisparse.models.siglip_navit import conv_patch_weight_to_linear

SIZES = dict(image_size=64, vit_image_size=28)
PATCH = "vit_model.vision_model.embeddings.patch_embedding.weight"


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    src = tmp_path_factory.mktemp("bagel")
    return src, write_fake_checkpoint(src)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_ema(path, edit):
    tensors = load_file(str(path / EMA))
    edit(tensors)
    save_file(tensors, str(path / EMA))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 28, 28, 3, generator=g), [[40, 41, 42], [43, 44]], [[50, 51], [52]]


def test_fake_has_bagels_layout(fake):
    src, _ = fake
    names = {p.name for p in src.iterdir()}
    assert {
        LLM_CONFIG,
        VIT_CONFIG,
        EMA,
        AE,
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    } <= names
    llm, vit = json.loads((src / LLM_CONFIG).read_text()), json.loads((src / VIT_CONFIG).read_text())
    assert llm["model_type"] == "qwen2" and llm["tie_word_embeddings"] is False
    assert set(PUBLISHED["llm"]) <= set(llm) and set(PUBLISHED["vit"]) <= set(vit)
    with safe_open(str(src / EMA), framework="pt") as f:
        assert f.metadata() is None  # BAGEL's ema.safetensors carries no metadata
        keys = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
        h = llm["hidden_size"]
        assert f.get_slice(PATCH).get_shape() == [vit["hidden_size"], 14 * 14 * 3]  # Linear, (ph, pw, c)
        assert f.get_slice("vit_pos_embed.pos_embed").get_shape() == [70 * 70, h]
        assert f.get_slice("latent_pos_embed.pos_embed").get_shape() == [64 * 64, h]
        assert f.get_slice("time_embedder.mlp.0.weight").get_shape() == [h, 256]
    assert "language_model.lm_head.weight" in keys and "language_model.model.norm_moe_gen.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_norm_moe_gen.weight" in keys
    assert "language_model.model.layers.1.mlp_moe_gen.down_proj.weight" in keys
    assert "connector.fc1.weight" in keys and "connector.fc2.bias" in keys
    vit_layers = {int(k.split(".")[4]) for k in keys if k.startswith("vit_model.vision_model.encoder.layers.")}
    assert len(vit_layers) == vit["num_hidden_layers"] - 1  # the json counts the layer BAGEL drops
    with safe_open(str(src / AE), framework="pt") as f:
        assert "encoder.conv_in.weight" in f.keys() and "decoder.up.0.block.0.conv1.weight" in f.keys()
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())


def test_strict_load_equals_the_native_model_on_both_tasks(fake):
    src, native = fake
    loaded = load_bagel(src, dtype=torch.float32, **SIZES)
    for k, v in native.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    images, questions, prompts = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.understanding_logits(images, questions),
            native.understanding_logits(images, questions),
            atol=0,
            rtol=0,
        )
    kwargs = dict(num_steps=2, cfg_scale=4.0, cfg_interval=(0.4, 1.0), cfg_renorm="global")
    torch.testing.assert_close(
        loaded.generate_images(prompts, [1, 2], **kwargs),
        native.generate_images(prompts, [1, 2], **kwargs),
        atol=0,
        rtol=0,
    )


def test_bf16_load_keeps_the_stored_values(fake):
    src, native = fake
    loaded = load_bagel(src, dtype=torch.bfloat16, **SIZES)
    assert loaded.dtype == torch.bfloat16
    ema = native.state_dict()["language_model.model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(loaded.state_dict()["language_model.model.layers.0.mlp.gate_proj.weight"].float(), ema)


@pytest.mark.parametrize("change", ["rename", "drop", "add", "reshape"])
def test_one_key_off_fails_naming_it(fake, tmp_path, change):
    src = _copy(fake[0], tmp_path / "ckpt")
    key = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"

    def edit(t):
        if change == "rename":
            t[key.replace("up_proj", "upp_proj")] = t.pop(key)
        elif change == "drop":
            del t[key]
        elif change == "add":
            t["language_model.model.layers.1.mlp_moe_gen.extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
        else:
            t[key] = t[key][:-1].contiguous()

    _rewrite_ema(src, edit)
    with pytest.raises(IntegrityError) as e:
        load_bagel(src, **SIZES)
    msg = str(e.value)
    assert key in msg if change != "add" else "mlp_moe_gen.extra.weight" in msg
    if change == "rename":
        assert "upp_proj" in msg
    if change == "reshape":
        assert "mis-shaped" in msg


@pytest.mark.parametrize("prefix", ["bagel.", "model."])
def test_extra_prefix_is_rejected(fake, tmp_path, prefix):
    src = _copy(fake[0], tmp_path / "ckpt")
    _rewrite_ema(src, lambda t: t.update({prefix + k: t.pop(k) for k in list(t)}))
    with pytest.raises(IntegrityError, match=f"extra prefix '{prefix}'"):
        load_bagel(src, **SIZES)


def test_tied_head_is_rejected(fake, tmp_path):
    src = _copy(fake[0], tmp_path / "ckpt")
    _rewrite_ema(src, lambda t: t.pop("language_model.lm_head.weight"))
    with pytest.raises(IntegrityError, match="tied head"):
        load_bagel(src, **SIZES)


def test_conv_patch_embedding_is_rejected(fake, tmp_path):
    src = _copy(fake[0], tmp_path / "ckpt")

    def to_conv(t):  # the original SigLIP layout [hidden, c, p, p]
        w = t[PATCH]
        t[PATCH] = w.reshape(w.shape[0], 14, 14, 3).permute(0, 3, 1, 2).contiguous()
        assert torch.equal(conv_patch_weight_to_linear(t[PATCH]), w)

    _rewrite_ema(src, to_conv)
    with pytest.raises(IntegrityError, match="Conv2d layout"):
        load_bagel(src, **SIZES)


def test_one_vit_layer_too_many_is_rejected(fake, tmp_path):
    src = _copy(fake[0], tmp_path / "ckpt")

    def add_layer(t):
        last = max(int(k.split(".")[4]) for k in t if k.startswith("vit_model.vision_model.encoder.layers."))
        for k in [k for k in t if k.startswith(f"vit_model.vision_model.encoder.layers.{last}.")]:
            t[k.replace(f"layers.{last}.", f"layers.{last + 1}.")] = t[k].clone()

    _rewrite_ema(src, add_layer)
    with pytest.raises(IntegrityError, match="the ViT has 3 encoder layers; BAGEL keeps 2"):
        load_bagel(src, **SIZES)


def test_missing_file_is_named(fake, tmp_path):
    src = _copy(fake[0], tmp_path / "ckpt")
    (src / AE).unlink()
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        load_bagel(src, **SIZES)


def test_imported_model_reloads_with_from_pretrained(fake, tmp_path):
    """The import verb's output is an ordinary model directory: every verb loads it with load_model."""
    from unisparse.cli import main

    src, native = fake
    out = tmp_path / "dense"
    main(
        [
            "import-bagel",
            "--src",
            str(src),
            "--out",
            str(out),
            "--dtype",
            "float32",
            "--image-size",
            "64",
            "--vit-image-size",
            "28",
        ]
    )
    assert (out / "tokenizer.json").is_file()
    model = load_model(out)
    images, questions, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model.understanding_logits(images, questions),
            native.understanding_logits(images, questions),
            atol=0,
            rtol=0,
        )


def test_published_sizes_count_as_the_closed_form():
    """BAGEL-7B-MoT on the meta device: per top-level module, the count equals its formula."""
    c = published_config()
    with torch.device("meta"):
        model = MoTForUnifiedModel(c)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    H, V, L, I, kv = 3584, 152064, 28, 18944, 4 * 128
    tower_layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 2 * 128 + 3 * H * I + 2 * H
    assert counts["language_model"] == 2 * V * H + 2 * H + 2 * L * tower_layer == 14_141_252_608
    vh, vi, vl = 1152, 4304, 26
    assert (
        counts["vit_model"]
        == vh * (14 * 14 * 3 + 1) + 70 * 70 * vh + vl * (4 * vh * vh + 2 * vh * vi + 9 * vh + vi) + 2 * vh
    )
    assert counts["connector"] == (vh * H + H) + (H * H + H)
    assert counts["vit_pos_embed"] == 70 * 70 * H and counts["latent_pos_embed"] == 64 * 64 * H
    assert counts["time_embedder"] == (256 * H + H) + (H * H + H)
    assert counts["vae2llm"] == 64 * H + H and counts["llm2vae"] == H * 64 + 64
    assert counts["vae_model"] == 83_819_683
    assert sum(counts.values()) == 14_691_079_811


def test_import_refuses_a_checkpoint_of_other_sizes(fake, tmp_path):
    """The workflow plans its grids with the config's `model:`; a checkpoint of other sizes is refused
    before any weight is read, naming the size."""
    from unisparse.cli import main

    with pytest.raises(SystemExit) as e:
        main(
            [
                "import-bagel",
                "--src",
                str(fake[0]),
                "--out",
                str(tmp_path / "dense"),
                "--image-size",
                "64",
                "--vit-image-size",
                "28",
                "--expect",
                json.dumps({"hidden_size": 3584, "num_hidden_layers": 2}),
            ]
        )
    assert e.value.code != 0
    assert not (tmp_path / "dense").exists()


def test_images_of_their_own_sizes_are_understood_alone_or_together(fake):
    """NaViT: images keep their aspect ratio; a batch of two sizes answers as each image alone, and a
    list of square images answers as the stacked batch."""
    src, native = fake
    g = torch.Generator().manual_seed(1)
    wide, tall = torch.rand(14, 42, 3, generator=g), torch.rand(28, 14, 3, generator=g)
    questions = [[40, 41, 42], [43]]
    with torch.no_grad():
        together = native.understanding_logits([wide, tall], questions)
        alone = torch.cat(
            [native.understanding_logits([wide], questions[:1]), native.understanding_logits([tall], questions[1:])]
        )
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        images = _inputs()[0]
        torch.testing.assert_close(
            native.understanding_logits(list(images), questions),
            native.understanding_logits(images, questions),
            atol=0,
            rtol=0,
        )
    with pytest.raises(ValueError, match="multiples of 14"):
        native.understanding_logits([torch.rand(15, 14, 3)], questions[:1])


def test_derived_models_keep_the_tokenizer(fake, tmp_path):
    """A model a verb derives from an imported checkpoint carries its tokenizer (real benchmarks
    tokenise with it) and is still an ordinary model directory."""
    from unisparse.cli import main
    from unisparse.text import FileTokenizer, tokenizer_for

    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    main(
        [
            "import-bagel",
            "--src",
            str(fake[0]),
            "--out",
            str(dense),
            "--dtype",
            "float32",
            "--image-size",
            "64",
            "--vit-image-size",
            "28",
        ]
    )
    main(
        [
            "prune-width",
            str(dense),
            "--component",
            "gen",
            "--keep-ratio",
            "0.5",
            "--score",
            "weight",
            "--out",
            str(pruned),
        ]
    )
    tok = tokenizer_for(pruned)
    assert isinstance(tok, FileTokenizer) and tok.decode(tok.encode("a red cube")) == "a red cube"
    assert load_model(pruned).config.mlp_width("gen", 0) == 64


def test_published_layout_predicts_the_real_ema_size_to_the_byte():
    """The size of BAGEL-7B-MoT's real ema.safetensors (29,214,685,336 bytes, in the lock) follows from
    the layout alone: the bf16 data of every non-VAE tensor plus safetensors' JSON header, whose length
    depends on every key's spelling and every shape. Our names and shapes predict it exactly."""
    from pathlib import Path

    lock = json.loads((Path(__file__).resolve().parents[1] / "data/bagel-7b-mot.lock.json").read_text())
    with torch.device("meta"):
        model = MoTForUnifiedModel(published_config())
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("vae_model.")}
    header, offset = {}, 0
    for name, t in sorted(tensors.items()):
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + 2 * t.numel()]}
        offset += 2 * t.numel()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    assert len(tensors) == 1223
    assert 8 + len(text) + offset == lock["files"][EMA]["size"] == 29_214_685_336
