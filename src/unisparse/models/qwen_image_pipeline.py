"""Qwen-Image's pipeline work, in the style of diffusers' ``QwenImagePipeline``: the files of a model
directory, and what the study's two tasks compute on the three components (``models.qwen_image``).

* **files**: a model directory is diffusers' pipeline layout (``model_index.json``, ``text_encoder/``,
  ``transformer/``, ``vae/``, ``tokenizer/``, ``scheduler/``) plus a ``SHA256SUMS`` manifest;
  ``model_index.json`` names the upstream classes and carries the settings under ``_unisparse``.
  ``load_pipeline`` is strict (manifest verified, safetensors only, every weight present, of the
  right shape and dtype kind); ``save_pipeline`` refuses non-finite weights and writes atomically.
* **understanding** (``QwenImageTasks.understanding_logits``): Qwen2-VL's image processor in torch
  (``smart_resize``, CLIP normalisation, merge-window patches), the chat template around the image
  pads and the question, M-RoPE positions, the next-token logits.
* **generation**: prompt embeddings are the text encoder's last hidden states after the chat
  template's system prefix (``encode_prompts``); ``prepare_latents`` draws each sample's noise from
  its own seed; sampling is flow-matching Euler on the scheduler's sigmas (``calculate_shift``) with
  true classifier-free guidance (the unconditional prompt is empty); ``flow_loss`` is the
  rectified-flow loss on normalised VAE latents.

The family adapter (``families.qwen_image``) names the structure and delegates here.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import (
    IntegrityError,
    atomic_path,
    check_finite_state,
    check_stored_dtypes,
    read_json,
    verify_model_dir,
    write_manifest,
)
from ..sharding import stored_float_dtype
from ..worlds import shapes
from .qwen_image import QwenImageMMDiT, QwenImageTextEncoder, default_dtype, pack_latents, resize_images, unpack_latents
from .sampling import check_renorm, guided_velocity

PIPELINE_CLASS = "QwenImagePipeline"
SETTINGS_KEY = "_unisparse"
#: the upstream classes a model directory's components load with (ours subclass the first two)
UPSTREAM_CLASSES = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}
#: the settings (stored in model_index.json under ``_unisparse``; templates are QwenImagePipeline's
#: and Qwen2.5-VL's chat templates)
SETTINGS_DEFAULTS = {
    "image_size": [shapes.CANVAS, shapes.CANVAS],  # what generate_images returns and flow_loss takes
    "gen_template": "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n",
    "und_template": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    "{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n",
    "max_sequence_length": 512,  # prompt tokens the MMDiT sees (the pipeline's default)
    "und_min_pixels": 56 * 56,  # Qwen2-VL image processor's resize bounds
    "und_max_pixels": 28 * 28 * 1280,
    "und_image_size": 448,  # the square a benchmark letterboxes its images to (a multiple of UND_GRID)
}
#: Qwen2-VL's 14-pixel patches merged 2 x 2: a square on this grid passes its processor unchanged
UND_GRID = 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_settings(settings: dict | None) -> dict:
    """``SETTINGS_DEFAULTS`` overridden by ``settings``; an unknown key is an error naming the known ones."""
    merged = {**SETTINGS_DEFAULTS, **(settings or {})}
    unknown = set(merged) - set(SETTINGS_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown Qwen-Image settings {sorted(unknown)}; expected {sorted(SETTINGS_DEFAULTS)}")
    return merged


class QwenImageModel(nn.Module):
    """Every weight of the pipeline in one module (what training and accounting iterate)."""

    def __init__(self, text_encoder: QwenImageTextEncoder, transformer: QwenImageMMDiT, vae: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.vae = vae


class TokenizerAdapter:
    """``encode`` / ``decode`` of a transformers tokenizer without added special tokens (ids are spliced
    into chat templates)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else 0


class RowObserver:
    """Adapts a ``LayerObserver`` to the models' per-layer callable: keeps the rows of valid tokens
    (``rows[slot]``: bool [B, T]) and names the component (and, in the MMDiT, the slot)."""

    def __init__(self, observer, component: str, rows: dict, with_slot: bool):
        self.observer, self.component, self.rows, self.with_slot = observer, component, rows, with_slot

    def __call__(self, layer, slot, h_in, attn_update, mlp_update, mlp_aux):
        mask = self.rows[slot]

        def pick(x):
            if x is None or not torch.is_tensor(x):
                return x
            if x.shape[:2] == mask.shape:
                return x[mask]
            if x.shape[0] == mask.numel():  # flattened tokens (an MoE block's router outputs)
                return x[mask.reshape(-1)]
            return x

        aux = None
        if mlp_aux is not None:
            aux = {k: pick(v) for k, v in mlp_aux.items()}
            if self.with_slot:
                aux["slot"] = slot
        elif self.with_slot and mlp_update is not None:
            aux = {"slot": slot}
        self.observer.on_layer(layer, self.component, pick(h_in), pick(attn_update), pick(mlp_update), aux)


def calculate_shift(seq_len: int, config) -> float:
    """The pipeline's resolution-dependent shift ``mu``: linear in the image token count."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return seq_len * m + base - m * base_len


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's image processor rule: sides multiples of ``factor`` (patch x merge), pixel count within
    [min_pixels, max_pixels], aspect ratio kept as well as that allows."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# --------------------------------------------------------------------------- files


def is_pipeline_dir(path) -> bool:
    """Whether ``path`` holds a ``QwenImagePipeline`` directory (its ``model_index.json`` says so)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return read_json(index).get("_class_name") == PIPELINE_CLASS
    except ValueError:
        return False


def _check_loading(directory: Path, info: dict) -> None:
    """Strict loading: every stored tensor lands in a parameter of the right shape and every parameter
    is filled (the libraries only warn)."""
    problems = [
        f"{len(info[k])} {k.replace('_', ' ')}: {sorted(map(str, info[k]))[:8]}"
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        if info.get(k)
    ]
    if problems:
        raise IntegrityError(f"{directory}: weights do not match the config: " + "; ".join(problems))


def _load_component(cls, directory: Path, dtype, library: str):
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing")
    dtype = dtype or stored_float_dtype(directory)
    if library == "transformers":
        kwargs = {"dtype": dtype}
    else:  # without accelerate diffusers builds the model first, then loads (it only warns about it)
        from diffusers.utils import is_accelerate_available

        kwargs = {"torch_dtype": dtype, "low_cpu_mem_usage": is_accelerate_available()}
    with default_dtype(dtype):  # diffusers without accelerate builds the model before loading: build it in dtype
        model, info = cls.from_pretrained(directory, use_safetensors=True, output_loading_info=True, **kwargs)
    _check_loading(directory, info)
    check_stored_dtypes(directory, {k: v.dtype for k, v in model.state_dict().items()})
    return model.eval()


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def load_pipeline(model_dir, device=None, dtype=None, require_manifest: bool = True):
    """``(model, tokenizer, scheduler_config, settings)`` of a model directory (or, with
    ``require_manifest`` False, a raw ``Qwen/Qwen-Image`` snapshot, which has no ``SHA256SUMS``):
    manifest verified, safetensors only, every weight present, of the right shape and dtype kind.
    ``dtype`` None keeps each component's stored dtype; ``settings`` are the stored ones."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    model_dir = Path(model_dir)
    if not is_pipeline_dir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a {PIPELINE_CLASS} directory (model_index.json)")
    verify_model_dir(model_dir, required=require_manifest)
    index = read_json(model_dir / "model_index.json")
    for name, expected in UPSTREAM_CLASSES.items():
        if index.get(name) != expected:
            raise IntegrityError(f"{model_dir}/model_index.json: {name} is {index.get(name)}, expected {expected}")
    model = QwenImageModel(
        _load_component(QwenImageTextEncoder, model_dir / "text_encoder", dtype, "transformers"),
        _load_component(QwenImageMMDiT, model_dir / "transformer", dtype, "diffusers"),
        _load_component(AutoencoderKLQwenImage, model_dir / "vae", dtype, "diffusers"),
    )
    if device is not None:
        model = model.to(device)
    scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(model_dir / "scheduler"))
    stored = index.get(SETTINGS_KEY, {}).get("settings", {})
    return model.eval(), _load_tokenizer(model_dir / "tokenizer"), scheduler_config, stored


def save_pipeline(
    out_dir, model: QwenImageModel, hf_tokenizer, scheduler_config: dict, settings: dict, family: str, extra_files=()
) -> None:
    """Write a model directory that ``load_pipeline`` reads back (atomically, with ``SHA256SUMS``;
    non-finite weights refused); ``family`` is recorded in ``model_index.json``."""
    check_finite_state(model, f"model for {out_dir}")
    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        model.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        model.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        save_pipeline_metadata(tmp, model, hf_tokenizer, scheduler_config, settings, family, weights=False)
        for path in extra_files:
            shutil.copyfile(path, tmp / Path(path).name)
        write_manifest(tmp)


def save_pipeline_metadata(
    tmp: Path, model: QwenImageModel, hf_tokenizer, scheduler_config: dict, settings: dict, family: str, weights=True
) -> None:
    """Everything of a pipeline directory but its weights: the scheduler, the tokenizer,
    ``model_index.json`` and (``weights`` True: the components' weights are written apart, as a
    sharded run does) each component's config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, __version__

    if weights:
        model.text_encoder.config.save_pretrained(tmp / "text_encoder")
        if getattr(model.text_encoder, "generation_config", None) is not None:
            model.text_encoder.generation_config.save_pretrained(tmp / "text_encoder")
        model.transformer.save_config(tmp / "transformer")
        model.vae.save_config(tmp / "vae")
    FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).save_pretrained(tmp / "scheduler")
    hf_tokenizer.save_pretrained(tmp / "tokenizer")
    ours = {"text_encoder": QwenImageTextEncoder, "transformer": QwenImageMMDiT}
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": __version__,
        **UPSTREAM_CLASSES,
        "tokenizer": ["transformers", type(hf_tokenizer).__name__],
        SETTINGS_KEY: {
            "family": family,
            "settings": settings,
            "classes": {k: f"{c.__module__}.{c.__name__}" for k, c in ours.items()},
        },
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def empty_pipeline(model_dir, dtype=None):
    """``load_pipeline``'s result with every parameter on the meta device (buffers real), nothing
    read but configs: a sharded run's starting point (``sharding.WeightFiles`` checks the headers)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    from ..sharding import parameters_on_meta

    model_dir = Path(model_dir)
    if not is_pipeline_dir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a {PIPELINE_CLASS} directory (model_index.json)")
    parts = {}
    classes = {"text_encoder": QwenImageTextEncoder, "transformer": QwenImageMMDiT, "vae": AutoencoderKLQwenImage}
    for name, cls in classes.items():
        directory = model_dir / name
        part_dtype = dtype or stored_float_dtype(directory)
        with parameters_on_meta(), default_dtype(part_dtype):
            if name == "text_encoder":
                parts[name] = cls(cls.config_class.from_pretrained(directory))
            else:
                parts[name] = cls.from_config(cls.load_config(directory))
        parts[name].to(part_dtype)
    model = QwenImageModel(parts["text_encoder"], parts["transformer"], parts["vae"]).eval()
    scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(model_dir / "scheduler"))
    stored = read_json(model_dir / "model_index.json").get(SETTINGS_KEY, {}).get("settings", {})
    return model, _load_tokenizer(model_dir / "tokenizer"), scheduler_config, stored


# --------------------------------------------------------------------------- tasks


class QwenImageTasks:
    """The two tasks on one ``QwenImageModel``, as ``QwenImagePipeline`` (generation) and Qwen2.5-VL's
    processor and forward (understanding) compute them. Holds references only: cheap to make."""

    def __init__(self, model: QwenImageModel, tokenizer: TokenizerAdapter, scheduler_config: dict, settings: dict):
        self.model, self.tokenizer, self.scheduler_config, self.settings = model, tokenizer, scheduler_config, settings
        self.text_encoder, self.transformer, self.vae = model.text_encoder, model.transformer, model.vae

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ inputs
    def und_size(self, height: int, width: int) -> tuple[int, int]:
        v = self.text_encoder.config.vision_config
        return smart_resize(
            height,
            width,
            v.patch_size * v.spatial_merge_size,
            self.settings["und_min_pixels"],
            self.settings["und_max_pixels"],
        )

    def pixel_inputs(self, images):
        """Qwen2-VL's image processor in torch: resize, CLIP-normalise, cut into (temporal x patch x
        patch) patches grouped by merge windows. Returns pixel_values, image_grid_thw, tokens per image."""
        v = self.text_encoder.config.vision_config
        images = torch.as_tensor(images, dtype=torch.float32, device=self.device)
        B, H, W, _ = images.shape
        h, w = self.und_size(H, W)
        x = resize_images(images, (h, w), mode="bicubic").clamp(0, 1).permute(0, 3, 1, 2)  # the processor's
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        p, m, tp = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.reshape(B, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, tp, -1, -1).reshape(B * gh * gw, 3 * tp * p * p)
        grid = torch.tensor([[1, gh, gw]] * B, dtype=torch.long, device=self.device)
        return x.to(self.text_encoder.dtype), grid, gh * gw // (m * m)

    def template_ids(self, template: str, *fields: str) -> list[list[int]]:
        """Token ids of the template's text between its ``fields`` placeholders."""
        pieces, rest = [], template
        for field in fields:
            head, sep, rest = rest.partition(field)
            if not sep:
                raise ValueError(f"template {template!r} has no {field} placeholder")
            pieces.append(head)
        return [self.tokenizer.encode(t) for t in pieces + [rest]]

    def pad(self, sequences: list[list[int]]):
        """Right-padded ids [B, T] and the bool mask of real tokens."""
        T = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), T), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(sequences), T, dtype=torch.bool)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
        return ids.to(self.device), mask.to(self.device)

    def run_text(self, embeds, mask, position_ids, observer):
        """The text decoder over ``embeds`` [B, T, H]; the observer sees the valid rows."""
        rows = RowObserver(observer, "und", {"mlp": mask}, with_slot=False) if observer is not None else None
        out = self.text_encoder.model.language_model(
            inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids, use_cache=False, observer=rows
        )
        return out.last_hidden_state

    # ------------------------------------------------------------------ understanding
    @torch.no_grad()
    def understanding_logits(self, images, question_ids, observer=None):
        """Next-token logits [B, V] (fp32) after each image and question (token id lists)."""
        te = self.text_encoder
        pixel_values, grid, n_image = self.pixel_inputs(images)
        pre, mid, post = self.template_ids(self.settings["und_template"], "{image}", "{question}")
        ids, mask = self.pad(
            [pre + [te.config.image_token_id] * n_image + mid + list(map(int, q)) + post for q in question_ids]
        )
        image_embeds = torch.cat(te.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output)
        embeds = te.model.get_input_embeddings()(ids)
        is_image = (ids == te.config.image_token_id) & mask
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        position_ids, _ = te.model.get_rope_index(
            ids, mm_token_type_ids=is_image.int(), image_grid_thw=grid, attention_mask=mask.long()
        )
        h = self.run_text(embeds, mask, position_ids, observer)
        last = h[torch.arange(len(ids), device=self.device), mask.sum(1) - 1]
        return te.lm_head(last).float()

    # ------------------------------------------------------------------ generation
    def encode_prompts(self, prompt_ids, observer=None):
        """Prompt embeddings [B, T, H] and their bool mask, as ``QwenImagePipeline``: the text encoder's
        last hidden states of the templated prompt, without the template's system prefix."""
        te = self.text_encoder
        pre, post = self.template_ids(self.settings["gen_template"], "{}")
        ids, mask = self.pad([pre + list(map(int, p)) + post for p in prompt_ids])
        positions = torch.arange(ids.shape[1], device=self.device).view(1, 1, -1).expand(3, len(ids), -1)
        h = self.run_text(te.model.get_input_embeddings()(ids), mask, positions, observer)
        limit = self.settings["max_sequence_length"]
        kept = [h[i, len(pre) : int(mask[i].sum())][:limit] for i in range(len(ids))]
        T = max(max(len(k) for k in kept), 1)
        embeds = h.new_zeros(len(kept), T, h.shape[-1])
        keep_mask = torch.zeros(len(kept), T, dtype=torch.bool, device=self.device)
        for i, k in enumerate(kept):
            embeds[i, : len(k)] = k
            keep_mask[i, : len(k)] = True
        return embeds, keep_mask

    @property
    def vae_scale(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def sample_size(self) -> tuple[int, int]:
        """The generated size: ``image_size`` rounded up to what the VAE and 2x2 patches allow."""
        f = 2 * self.vae_scale
        return tuple(-(-int(s) // f) * f for s in self.settings["image_size"])

    def latent_grid(self) -> tuple[int, int]:
        return tuple(s // self.vae_scale for s in self.sample_size)

    def noise_shape(self, n: int) -> tuple[int, ...]:
        """Shape of the packed latent tokens (the noise ``flow_loss`` takes) for n images."""
        h, w = self.latent_grid()
        return (n, (h // 2) * (w // 2), 4 * self.vae.config.z_dim)

    def prepare_latents(self, seeds):
        """Packed fp32 noise, each sample's drawn on the CPU from its own seed (as the pipeline draws it,
        then packed), so an image does not depend on its batch or device."""
        shape = (1, self.vae.config.z_dim, 1, *self.latent_grid())
        x = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return pack_latents(x).to(self.device)

    def _latent_stats(self):
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean, device=self.device, dtype=torch.float32).view(1, z, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=self.device, dtype=torch.float32).view(1, z, 1, 1, 1)
        return mean, std

    def encode_images(self, images):
        """[B, H, W, 3] in [0, 1] -> normalised latent tokens [B, L, 4 z] (the VAE posterior's mean)."""
        x = resize_images(torch.as_tensor(images, dtype=torch.float32, device=self.device), self.sample_size)
        x = (x.permute(0, 3, 1, 2).unsqueeze(2) * 2 - 1).to(self.vae.dtype)
        mean, std = self._latent_stats()
        latents = (self.vae.encode(x).latent_dist.mode().float() - mean) / std
        return pack_latents(latents)

    def latent_moments(self, images):
        """The VAE posterior's normalised mean and standard deviation as packed tokens (fp32 [B, L, 4 z]
        each) of images [B, H, W, 3] in [0, 1] at ``sample_size``: ``mean`` is ``encode_images``."""
        x = resize_images(torch.as_tensor(images, dtype=torch.float32, device=self.device), self.sample_size)
        x = (x.permute(0, 3, 1, 2).unsqueeze(2) * 2 - 1).to(self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        mean, std = self._latent_stats()
        return pack_latents((dist.mean.float() - mean) / std), pack_latents(dist.std.float() / std)

    def velocity_at(self, prompt_ids, x_t, t, cond_keep=None, observer=None):
        """The MMDiT's velocity (fp32) at noised tokens ``x_t`` and times ``t`` after each prompt (the
        text encoder runs without gradients); ``cond_keep`` False gives that sample the empty prompt."""
        if cond_keep is not None:
            prompt_ids = [p if bool(k) else [] for p, k in zip(prompt_ids, cond_keep.tolist())]
        with torch.no_grad():
            embeds, mask = self.encode_prompts(prompt_ids, observer)
        x_t, t = x_t.to(self.device, torch.float32), t.to(self.device, torch.float32)
        return self.velocity(x_t, t, embeds, mask, observer)

    def decode_latents(self, tokens):
        """Latent tokens [B, L, 4 z] -> images [B, H, W, 3] in [0, 1] at ``image_size``."""
        mean, std = self._latent_stats()
        latents = unpack_latents(tokens.float(), *self.latent_grid()) * std + mean
        x = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0][:, :, 0]
        images = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return resize_images(images, self.settings["image_size"]).clamp(0, 1)

    def velocity(self, x, t, embeds, mask, observer=None):
        """The MMDiT's velocity prediction (fp32) for latent tokens ``x`` at times ``t`` [B] in [0, 1]."""
        tr = self.transformer
        h, w = self.latent_grid()
        rows = None
        if observer is not None:
            img_rows = torch.ones(x.shape[:2], dtype=torch.bool, device=self.device)
            rows = RowObserver(observer, "gen", {"img_mlp": img_rows, "txt_mlp": mask}, with_slot=True)
        # as the pipeline: no mask when every text token is real (lets attention use its fastest kernel)
        out = tr(
            hidden_states=x.to(tr.dtype),
            timestep=t.to(tr.dtype),
            encoder_hidden_states=embeds.to(tr.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, h // 2, w // 2)]] * len(x),
            observer=rows,
            return_dict=False,
        )[0]
        return out.float()

    def sigmas(self, num_steps: int, seq_len: int, shift):
        """The scheduler's sigmas for ``num_steps`` steps (then 0), as the pipeline sets them; a given
        ``shift`` replaces the dynamic shift by a static one."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        overrides = {} if shift is None else {"use_dynamic_shifting": False, "shift": float(shift)}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config, **overrides)
        mu = calculate_shift(seq_len, scheduler.config) if scheduler.config.use_dynamic_shifting else None
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.tolist()

    @staticmethod
    def _cat_text(a, b):
        """Two (embeds, mask) batches padded to one length and stacked."""
        T = max(a[0].shape[1], b[0].shape[1])
        pad = lambda e, m: (F.pad(e, (0, 0, 0, T - e.shape[1])), F.pad(m, (0, T - m.shape[1])))  # noqa: E731
        (ea, ma), (eb, mb) = pad(*a), pad(*b)
        return torch.cat([ea, eb]), torch.cat([ma, mb])

    @torch.no_grad()
    def generate_images(
        self,
        prompt_ids,
        seeds,
        observer=None,
        num_steps: int = 20,
        cfg_scale: float = 4.0,
        cfg_interval=(0.0, 1.0),
        cfg_renorm: str = "none",
        cfg_renorm_min: float = 0.0,
        shift=None,
    ):
        """Euler sampling on the scheduler's sigmas with true CFG where ``cfg_interval[0] < sigma <=
        cfg_interval[1]`` (unconditional prompt: empty), from ``prepare_latents(seeds)``. Returns
        [B, H, W, 3]."""
        check_renorm(cfg_renorm)
        B = len(prompt_ids)
        cond = self.encode_prompts(prompt_ids, observer)
        both = self._cat_text(cond, self.encode_prompts([[]] * B, observer)) if cfg_scale != 1.0 else None
        x = self.prepare_latents(seeds)  # the Euler state stays fp32
        sigmas = self.sigmas(num_steps, x.shape[1], shift)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            guided = both is not None and cfg_interval[0] < sigma <= cfg_interval[1]
            embeds, mask = both if guided else cond
            xs = torch.cat([x, x]) if guided else x
            t = torch.full((len(xs),), sigma, device=self.device)
            v = self.velocity(xs, t, embeds, mask, observer)
            if guided:
                v = guided_velocity(v[:B], v[B:], cfg_scale, cfg_renorm, cfg_renorm_min)
            x = x + (sigma_next - sigma) * v
        return self.decode_latents(x)

    def flow_loss(self, prompt_ids, images, cond_keep=None, noise=None, t=None, observer=None):
        """Rectified-flow loss (fp32) of the MMDiT: ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``
        on normalised VAE latents; t = sigmoid(N(0, 1)) unless given. Text encoder and VAE run without
        gradients (only the MMDiT trains); ``cond_keep`` False gives that sample the empty prompt."""
        if cond_keep is not None:
            prompt_ids = [p if bool(k) else [] for p, k in zip(prompt_ids, cond_keep.tolist())]
        with torch.no_grad():
            embeds, mask = self.encode_prompts(prompt_ids, observer)
            x0 = self.encode_images(images)
        B = len(x0)
        noise = torch.randn(x0.shape) if noise is None else noise
        t = torch.sigmoid(torch.randn(B)) if t is None else t
        noise, t = noise.to(self.device, torch.float32), t.to(self.device, torch.float32)
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
        v = self.velocity(x_t, t, embeds, mask, observer)
        return F.mse_loss(v, noise - x0)
