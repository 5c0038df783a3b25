"""BAGEL-7B-MoT's published files onto the unisparse MoT: a strict loader and a fake of its layout.

BAGEL's directory holds ``llm_config.json`` (Qwen2.5-7B's values), ``vit_config.json`` (SigLIP
so400m/14 with 27 layers, of which BAGEL keeps 26), ``ema.safetensors`` (the whole model but the VAE, in
bf16, names as in ``modeling_mot``), ``ae.safetensors`` (the FLUX autoencoder, its own ``encoder.*`` /
``decoder.*`` names) and Qwen2 tokenizer files. The rest of BAGEL's configuration is hard-coded in its
inference code (2x2 latent patches, 64x64 latent positions, 70x70 ViT positions, a 256-d time
embedding, timestep shift 3): ``BAGEL_LAYOUT`` holds those values once.

Strict means every tensor in the files lands in exactly one parameter of the right shape and every
parameter is filled. BAGEL's own loaders use ``strict=False``, which hid prefix bugs downstream; here a
missing, unexpected or mis-shaped key is an error that names it, and the known traps (an extra
``bagel.``/``model.`` prefix, a tied head, a Conv2d patch embedding, one ViT layer too many) get their
own message. Loading never unpickles and never holds a second copy: the model is built on the meta
device, allocated once, and filled tensor by tensor from the safetensors files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..io import IntegrityError, atomic_path, dtype_mismatches, safetensors_header, weight_mismatches
from ..sizes import BAGEL_IMAGE_SIZE as IMAGE_SIZE
from ..sizes import BAGEL_LATENT_DOWNSAMPLE, BAGEL_LATENT_PATCH_SIZE
from ..sizes import BAGEL_VIT_IMAGE_SIZE as VIT_IMAGE_SIZE
from .configuration_mot import MoTConfig
from .modeling_mot import MoTForUnifiedModel

LLM_CONFIG, VIT_CONFIG, EMA, AE = "llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"
REQUIRED_FILES = (LLM_CONFIG, VIT_CONFIG, EMA, AE, "tokenizer.json")
#: the VAE's weights live in ae.safetensors without a prefix; in the model they are ``vae_model.*``
AE_PREFIX = "vae_model."
#: BAGEL's special tokens (``data/data_utils.py``): the chat markers double as bos / eos
SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "image_start_token_id": "<|vision_start|>",
    "image_end_token_id": "<|vision_end|>",
    "pad_token_id": "<|endoftext|>",
}
#: what BAGEL's inference code fixes and no file records
BAGEL_LAYOUT = dict(
    vision="siglip_navit",
    codec="flux",
    prompt_format="bagel",
    latent_patch_size=BAGEL_LATENT_PATCH_SIZE,
    latent_downsample=BAGEL_LATENT_DOWNSAMPLE,
    max_latent_size=64,
    vit_max_num_patch_per_side=70,
    time_embed_dim=256,
    timestep_scale=1.0,
    timestep_shift=3.0,
    latent_pos_embed="sincos",
    num_channels=3,
)
#: FLUX's latent scale and shift (BAGEL's ``load_ae``; not stored in ae.safetensors)
FLUX_SCALE_SHIFT = dict(scale_factor=0.3611, shift_factor=0.1159)
LLM_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "vocab_size",
)
VIT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "num_channels",
    "layer_norm_eps",
    "hidden_act",
)


def _read_json(path: Path, keys) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not a BAGEL checkpoint: no {path.name}")
    data = json.loads(path.read_text())
    missing = [k for k in keys if k not in data]
    if missing:
        raise IntegrityError(f"{path}: missing keys {missing}")
    return data


def special_token_ids(src) -> dict[str, int]:
    """Ids of BAGEL's special tokens, read from ``tokenizer.json``'s added tokens (no tokenizer built)."""
    path = Path(src) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} has no tokenizer.json (the Qwen2 tokenizer BAGEL ships)")
    added = {t["content"]: int(t["id"]) for t in json.loads(path.read_text()).get("added_tokens", [])}
    missing = [tok for tok in SPECIAL_TOKENS.values() if tok not in added]
    if missing:
        raise IntegrityError(f"{path}: special tokens {missing} are not among its added tokens")
    return {name: added[tok] for name, tok in SPECIAL_TOKENS.items()}


def _stored_header(path: Path, prefix: str = "") -> dict[str, tuple[tuple, str]]:
    """{prefix + key: (shape, dtype name)} of one of BAGEL's safetensors files (headers only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not a BAGEL checkpoint: no {path.name}")
    return safetensors_header(path, prefix)


def _stored_shapes(path: Path, prefix: str = "") -> dict[str, tuple]:
    return {k: shape for k, (shape, _) in _stored_header(path, prefix).items()}


def flux_sizes_from_shapes(ae_shapes: dict[str, tuple]) -> dict:
    """The FLUX autoencoder's sizes, read off its weight shapes (BAGEL hard-codes them; a fake or a
    smaller AE states them only through its tensors)."""
    conv_in = ae_shapes.get("encoder.conv_in.weight")
    if conv_in is None or "encoder.conv_out.weight" not in ae_shapes:
        raise IntegrityError(f"{AE} is not a FLUX autoencoder: no encoder.conv_in.weight / encoder.conv_out.weight")
    levels = sorted({int(m.group(1)) for k in ae_shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in ae_shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    ch = conv_in[0]
    return dict(
        in_channels=conv_in[1],
        ch=ch,
        out_ch=ae_shapes["decoder.conv_out.weight"][0],
        ch_mult=[ae_shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels],
        num_res_blocks=len(blocks),
        z_channels=ae_shapes["encoder.conv_out.weight"][0] // 2,
    )


def bagel_config(
    llm: dict, vit: dict, ae: dict, token_ids: dict, image_size: int = IMAGE_SIZE, vit_image_size: int = VIT_IMAGE_SIZE
) -> MoTConfig:
    """The MoT config from BAGEL's three sources of sizes: ``llm_config.json`` (``llm``), ``vit_config.json``
    (``vit``; its layer count includes the one BAGEL drops) and the FLUX AE's sizes (``ae``)."""
    vit_sizes = {k: vit[k] for k in VIT_KEYS}
    vit_sizes["num_hidden_layers"] = vit["num_hidden_layers"] - 1  # BAGEL uses the penultimate layer's features
    ae = {**ae, **FLUX_SCALE_SHIFT}
    layout = {**BAGEL_LAYOUT, "latent_downsample": 2 ** (len(ae["ch_mult"]) - 1)}
    return MoTConfig(
        **{k: llm[k] for k in LLM_KEYS},
        head_dim=llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"],
        image_size=image_size,
        vit_image_size=vit_image_size,
        vit_patch_size=vit["patch_size"],
        vit_hidden_size=vit["hidden_size"],
        vit_config=vit_sizes,
        codec_config=ae,
        latent_channels=ae["z_channels"],
        **layout,
        **token_ids,
    )


def config_from_bagel(src, image_size: int = IMAGE_SIZE, vit_image_size: int = VIT_IMAGE_SIZE) -> MoTConfig:
    """The MoT config of a BAGEL directory: sizes from its JSON files, token ids from its tokenizer, the
    VAE's sizes from ``ae.safetensors``' shapes, the rest from ``BAGEL_LAYOUT``."""
    src = Path(src)
    return bagel_config(
        _read_json(src / LLM_CONFIG, LLM_KEYS),
        _read_json(src / VIT_CONFIG, VIT_KEYS),
        flux_sizes_from_shapes(_stored_shapes(src / AE)),
        special_token_ids(src),
        image_size,
        vit_image_size,
    )


#: BAGEL-7B-MoT's sizes as published (Qwen2.5-7B-Instruct's llm_config, SigLIP so400m/14's vit_config,
#: FLUX.1's AE, Qwen2's token ids), for planning and parameter counts without the files; the loader
#: always reads the real files
PUBLISHED = dict(
    llm=dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        vocab_size=152064,
    ),
    vit=dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=14,
        num_channels=3,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    ),
    ae=dict(in_channels=3, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=16),
    token_ids=dict(
        pad_token_id=151643,
        bos_token_id=151644,
        eos_token_id=151645,
        image_start_token_id=151652,
        image_end_token_id=151653,
    ),
)


def published_config(image_size: int = IMAGE_SIZE, vit_image_size: int = VIT_IMAGE_SIZE) -> MoTConfig:
    return bagel_config(
        PUBLISHED["llm"], PUBLISHED["vit"], PUBLISHED["ae"], PUBLISHED["token_ids"], image_size, vit_image_size
    )


def _diagnose(stored: dict, expected: dict, vit_layers: int) -> list[str]:
    """Messages for the known ways a checkpoint differs from BAGEL's layout (checked before the
    generic key lists, which would only say "missing" and "unexpected")."""
    problems = []
    for prefix in ("bagel.", "model.", "module."):
        hits = [k for k in stored if k.startswith(prefix) and k[len(prefix) :] in expected]
        if hits:
            problems.append(
                f"{len(hits)} keys carry an extra prefix {prefix!r} (e.g. {hits[0]}); BAGEL-7B-MoT "
                f"stores them without one: strip it before loading"
            )
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if head not in stored and embed in stored:
        problems.append(
            f"{head} is missing: a tied head (LM head = embeddings); BAGEL-7B-MoT stores an untied "
            f"head and tie_word_embeddings is forced off"
        )
    patch = "vit_model.vision_model.embeddings.patch_embedding.weight"
    if patch in stored and len(stored[patch]) == 4:
        problems.append(
            f"{patch} has the Conv2d layout {list(stored[patch])}; BAGEL stores the patch embedding as "
            f"a Linear {list(expected.get(patch, ()))} in (ph, pw, c) order "
            f"(siglip_navit.conv_patch_weight_to_linear converts it)"
        )
    layers = {
        int(m.group(1)) for k in stored if (m := re.match(r"vit_model\.vision_model\.encoder\.layers\.(\d+)\.", k))
    }
    if layers and max(layers) >= vit_layers:
        problems.append(
            f"the ViT has {max(layers) + 1} encoder layers; BAGEL keeps {vit_layers} "
            f"(vit_config.json's num_hidden_layers minus one): layer(s) {sorted(layers - set(range(vit_layers)))} "
            f"are unexpected"
        )
    return problems


def check_bagel_keys(src, model) -> dict[str, tuple[Path, str]]:
    """Map every model tensor to (file, key in file) or raise naming each problem. Headers only."""
    src = Path(src)
    sources = {}
    stored, dtypes = {}, {}
    for path, prefix in ((src / EMA, ""), (src / AE, AE_PREFIX)):
        for key, (shape, dtype) in _stored_header(path, prefix).items():
            if key in stored:
                raise IntegrityError(f"{src}: tensor {key} is stored twice ({sources[key][0].name}, {path.name})")
            stored[key], dtypes[key] = shape, dtype
            sources[key] = (path, key[len(prefix) :])
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    problems = _diagnose(stored, expected, model.config.vit_config.get("num_hidden_layers", 0))
    problems += weight_mismatches(stored, expected)
    for path, _ in ((src / EMA, ""), (src / AE, AE_PREFIX)):
        problems += dtype_mismatches(
            {k: d for k, d in dtypes.items() if sources[k][0] == path},
            {k: v.dtype for k, v in state.items()},
            where=f"{path.name}:",
        )
    if problems:
        raise IntegrityError(f"{src} does not match BAGEL-7B-MoT's layout: " + "; ".join(problems))
    return sources


def load_bagel(
    src, device="cpu", dtype=torch.bfloat16, image_size: int = IMAGE_SIZE, vit_image_size: int = VIT_IMAGE_SIZE
) -> MoTForUnifiedModel:
    """A BAGEL directory as a ``MoTForUnifiedModel`` on ``device`` in ``dtype``, loaded strictly."""
    from safetensors import safe_open

    config = config_from_bagel(src, image_size, vit_image_size)
    with torch.device("meta"):
        model = MoTForUnifiedModel(config).to(dtype)
    sources = check_bagel_keys(src, model)
    if any(True for _ in model.buffers()):
        raise RuntimeError("the MoT holds buffers the checkpoint cannot fill; load_bagel must initialise them")
    model.to_empty(device=device)  # the one allocation of the weights
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, (path, _) in sources.items():
        by_file.setdefault(path, []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    params[name].copy_(f.get_tensor(sources[name][1]))
    return model.eval()


# ---------------------------------------------------------------------------------------------- the fake
FAKE_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    vit_hidden_size=32,
    vit_intermediate_size=64,
    vit_layers=2,
    vit_heads=2,
    vit_patch_size=14,
    ae_ch=32,
    ae_ch_mult=[1, 1, 1, 1],
    ae_res_blocks=1,
    image_size=64,
    vit_image_size=28,
)


def _fake_tokenizer(out: Path) -> dict[str, int]:
    """A byte-level BPE tokenizer in Qwen2's file layout (256 byte tokens, then the special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    ids = {s: tok.token_to_id(s) for s in specials}
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 32768,
                "added_tokens_decoder": {str(i): {"content": s, "special": True} for s, i in ids.items()},
            },
            indent=2,
        )
    )
    return ids


def write_fake_checkpoint(out_dir, sizes: dict | None = None, seed: int = 0) -> MoTForUnifiedModel:
    """Write a BAGEL-7B-MoT directory at small sizes: BAGEL's file names, config keys, weight names, dtypes
    (bf16 ``ema.safetensors`` without metadata, fp32 ``ae.safetensors``) and layouts (Linear patch
    embedding, untied head, sin-cos position tables, ``vit_config.json`` one layer longer than the ViT
    stored). Returns the native model holding exactly the written weights (fp32, bf16-representable),
    so a loader can be checked against it. ``sizes`` overrides ``FAKE_SIZES``."""
    from safetensors.torch import save_file

    s = {**FAKE_SIZES, **(sizes or {})}
    unknown = sorted(set(s) - set(FAKE_SIZES))
    if unknown:
        raise ValueError(f"unknown fake-checkpoint sizes {unknown}; known: {sorted(FAKE_SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _fake_tokenizer(out)
    vocab_size = -(-(max(ids.values()) + 1) // 64) * 64  # padded like Qwen2's 152064
    llm = dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_act="silu",
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        rms_norm_eps=s["rms_norm_eps"],
        rope_theta=s["rope_theta"],
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        max_window_layers=s["num_hidden_layers"],
        sliding_window=32768,
        use_sliding_window=False,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
    )
    vit = dict(
        model_type="siglip_vision_model",
        hidden_size=s["vit_hidden_size"],
        intermediate_size=s["vit_intermediate_size"],
        num_hidden_layers=s["vit_layers"] + 1,
        num_attention_heads=s["vit_heads"],
        num_channels=3,
        image_size=s["vit_image_size"],
        patch_size=s["vit_patch_size"],
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )
    (out / LLM_CONFIG).write_text(json.dumps(llm, indent=2))
    (out / VIT_CONFIG).write_text(json.dumps(vit, indent=2))
    ae_sizes = dict(
        ch=s["ae_ch"],
        ch_mult=s["ae_ch_mult"],
        num_res_blocks=s["ae_res_blocks"],
        z_channels=16,
        in_channels=3,
        out_ch=3,
    )
    config = bagel_config(
        llm,
        vit,
        ae_sizes,
        {name: ids[tok] for name, tok in SPECIAL_TOKENS.items()},
        s["image_size"],
        s["vit_image_size"],
    )
    torch.manual_seed(seed)
    model = MoTForUnifiedModel(config).eval()
    with torch.no_grad():  # random norms and biases, and every weight representable in bf16
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.startswith(AE_PREFIX):
                p.add_(torch.randn_like(p) * 0.1)
            if not name.startswith(AE_PREFIX):
                p.copy_(p.bfloat16().float())
    state = model.state_dict()
    ema = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items() if not k.startswith(AE_PREFIX)}
    ae = {k[len(AE_PREFIX) :]: v.contiguous() for k, v in state.items() if k.startswith(AE_PREFIX)}
    for name, tensors in ((EMA, ema), (AE, ae)):
        with atomic_path(out / name) as tmp:
            save_file(tensors, str(tmp))
    return model
