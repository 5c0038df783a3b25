"""Qwen-Image's two study components, with their pruning / MoE structure recorded in their configs.

* ``QwenImageTextEncoder`` (understanding): transformers' ``Qwen2_5_VLForConditionalGeneration`` whose
  decoder layers are built from ``QwenImageTextEncoderConfig`` (skipped sublayers are not built,
  each MLP has its own width or is an MoE block);
* ``QwenImageMMDiT`` (generation): diffusers' ``QwenImageTransformer2DModel`` whose dual-stream blocks
  are built the same way from the extra ``register_to_config`` arguments.

Both keep the upstream parameter names (a vanilla checkpoint loads into them unchanged, and an
unpruned one saved from them loads into the vanilla classes), and both take an optional
``observer(layer, slot, h_in, attn_update, mlp_update, mlp_aux)`` callable in ``forward`` that sees
[B, T, H] tensors per layer (per stream in the MMDiT: slot ``img_mlp`` / ``txt_mlp``).

Structure (the same three keys in both configs; layers count from 0):
  * ``skip``: ``{"attn": [layers], "mlp": [layers]}`` (a dropped block is in both lists);
  * ``mlp_widths``: ``{slot: [width per layer]}`` (a missing slot has the config's default width);
  * ``moe``: the MoE spec (``layers``, ``num_experts``, ``top_k``, ...) or None, and ``moe_slots``:
    which MLP slots of those layers are MoE blocks (default: every slot).

``restructured`` copies a component into a new structure, weights carried over exactly (what the
family's ``rebuild`` calls). The pipeline work on these components (files, both tasks) is in
``models.qwen_image_pipeline``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    compute_text_seq_len_from_mask,
)
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLAttention,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLRMSNorm,
)

from ..choices import SUBLAYERS
from .blocks import MLPWeights, SwiGLUMLP

UND_SLOTS = ("mlp",)
GEN_SLOTS = ("img_mlp", "txt_mlp")


# --------------------------------------------------------------------------- structure


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype`` (as transformers' from_pretrained does)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def normalise_structure(skip, mlp_widths, moe, moe_slots, slots, num_layers: int) -> tuple:
    """Validated, JSON-ready ``(skip, mlp_widths, moe, moe_slots)``: errors name the offending key
    here rather than as a shape mismatch at load."""
    given = dict(skip or {})
    if set(given) - set(SUBLAYERS):
        raise ValueError(f"skip has unknown sublayers {sorted(set(given) - set(SUBLAYERS))}; expected {SUBLAYERS}")
    skip = {s: sorted({int(i) for i in given.get(s, [])}) for s in SUBLAYERS}
    for s, layers in skip.items():
        if any(not 0 <= i < num_layers for i in layers):
            raise ValueError(f"skip[{s!r}] = {layers} is outside 0..{num_layers - 1}")
    widths = {}
    for slot, ws in (mlp_widths or {}).items():
        if slot not in slots:
            raise ValueError(f"mlp_widths has unknown slot {slot!r}; expected one of {slots}")
        if len(ws) != num_layers or any(int(w) < 1 for w in ws):
            raise ValueError(f"mlp_widths[{slot!r}] must list a positive width for each of {num_layers} layers")
        widths[slot] = [int(w) for w in ws]
    if moe is not None:
        moe = dict(moe)
        for key in ("layers", "num_experts", "top_k", "expert_size"):
            if key not in moe:
                raise ValueError(f"moe spec is missing {key!r}")
        moe["layers"] = sorted(int(i) for i in moe["layers"])
        if any(i in skip["mlp"] for i in moe["layers"]):
            raise ValueError(f"moe layers {moe['layers']} include dropped MLPs {skip['mlp']}")
        moe_slots = list(slots) if moe_slots is None else [s for s in slots if s in moe_slots]
        if not moe_slots:
            raise ValueError(f"moe_slots must name at least one of {slots}")
    else:
        moe_slots = None
    return skip, widths, moe, moe_slots


def mlp_plan(skip, mlp_widths, moe, moe_slots, slot: str, layer: int, default_width: int):
    """What one MLP slot holds: None (dropped), ``("moe", spec)`` or ``("dense", width)``."""
    if layer in skip["mlp"]:
        return None
    if moe is not None and layer in moe["layers"] and slot in moe_slots:
        return ("moe", moe)
    widths = mlp_widths.get(slot)
    return ("dense", widths[layer] if widths else default_width)


def build_moe(hidden_size: int, spec: dict, activation: str) -> nn.Module:
    """An MoE block from the recorded spec (``models.moe_block``, imported here because only MoE
    models need it)."""
    from .moe_block import MoEMLP

    if spec.get("activation", activation) != activation:
        raise ValueError(f"this component's MLPs are {activation}; the MoE spec says {spec['activation']!r}")
    return MoEMLP(hidden_size, {**spec, "activation": activation})


def run_mlp(mlp: nn.Module, x, want_aux: bool):
    """(output, aux or None) of an MLP on the flattened tokens (an MoE block routes [N, H] rows); aux,
    with one row per token, only when an observer wants it (it costs the activations)."""
    flat = x.reshape(-1, x.shape[-1])
    if want_aux:
        out, aux = mlp(flat, return_aux=True)
    else:
        out, aux = mlp(flat), None
    return out.view(x.shape[:-1] + out.shape[-1:]), aux


class QwenFeedForward(FeedForward):
    """diffusers' GELU-tanh ``FeedForward`` (``net.0.proj`` up with bias, ``net.2`` down with bias) with
    a chosen width and the ``forward(x, return_aux)`` of ``models.blocks``, so its neuron
    activations can be observed while the weight names stay diffusers'."""

    kind = "gelu"

    def __init__(self, dim: int, width: int):
        super().__init__(dim=dim, dim_out=dim, activation_fn="gelu-approximate", inner_dim=width)

    def forward(self, hidden_states, return_aux: bool = False):
        act = self.net[0](hidden_states)
        out = act
        for module in self.net[1:]:
            out = module(out)
        return (out, {"act": act}) if return_aux else out

    def weights(self) -> MLPWeights:
        up, down = self.net[0].proj, self.net[2]
        return MLPWeights(
            "gelu", up.weight.detach(), down.weight.detach(), up_bias=up.bias.detach(), down_bias=down.bias.detach()
        )

    def state_from(self, weights: MLPWeights) -> dict:
        """This module's state dict holding ``weights`` (missing biases are zeros)."""
        zeros = weights.up.new_zeros
        return {
            "net.0.proj.weight": weights.up,
            "net.2.weight": weights.down,
            "net.0.proj.bias": weights.up_bias if weights.up_bias is not None else zeros(weights.width),
            "net.2.bias": weights.down_bias if weights.down_bias is not None else zeros(weights.hidden_size),
        }


def dense_mlp_weights(module: nn.Module) -> MLPWeights | None:
    """The dense MLP's weights (None for an MoE block)."""
    if isinstance(module, QwenFeedForward):
        return module.weights()
    if isinstance(module, SwiGLUMLP):
        return MLPWeights.of(module)
    return None


def mlp_state(module: nn.Module, weights: MLPWeights) -> dict:
    """State dict of a dense MLP module of this file holding ``weights``."""
    if isinstance(module, QwenFeedForward):
        if weights.kind != "gelu":
            raise ValueError(f"a {weights.kind} MLP cannot replace a GELU MLP")
        return module.state_from(weights)
    if weights.kind != "swiglu":
        raise ValueError(f"a {weights.kind} MLP cannot replace a SwiGLU MLP")
    return {"gate_proj.weight": weights.gate, "up_proj.weight": weights.up, "down_proj.weight": weights.down}


# --------------------------------------------------------------------------- understanding: text encoder


@strict
class QwenImageTextEncoderConfig(Qwen2_5_VLConfig):
    """``Qwen2_5_VLConfig`` plus the structure of the text decoder (see the module docstring). The
    model type stays ``qwen2_5_vl`` so that transformers' checkpoint key conversion applies."""

    skip: dict | None = None
    mlp_widths: dict | None = None
    moe: dict | None = None
    moe_slots: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.skip, self.mlp_widths, self.moe, self.moe_slots = normalise_structure(
            self.skip, self.mlp_widths, self.moe, self.moe_slots, UND_SLOTS, self.text_config.num_hidden_layers
        )

    def mlp_plan(self, layer: int, slot: str = "mlp"):
        return mlp_plan(
            self.skip, self.mlp_widths, self.moe, self.moe_slots, slot, layer, self.text_config.intermediate_size
        )


class StructuredDecoderLayer(Qwen2_5_VLDecoderLayer):
    """A Qwen2.5-VL decoder layer holding only the sublayers its config keeps (same weight names).
    It subclasses the upstream layer so transformers' output recording still finds it, but builds
    its own modules: a dropped sublayer is never allocated."""

    def __init__(self, config: QwenImageTextEncoderConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        text = config.text_config
        self.hidden_size = text.hidden_size
        self.layer_idx = layer_idx
        if layer_idx not in config.skip["attn"]:
            self.input_layernorm = Qwen2_5_VLRMSNorm(text.hidden_size, eps=text.rms_norm_eps)
            self.self_attn = Qwen2_5_VLAttention(text, layer_idx)
        plan = config.mlp_plan(layer_idx)
        if plan is not None:
            self.post_attention_layernorm = Qwen2_5_VLRMSNorm(text.hidden_size, eps=text.rms_norm_eps)
            kind, arg = plan
            self.mlp = build_moe(text.hidden_size, arg, "swiglu") if kind == "moe" else SwiGLUMLP(text.hidden_size, arg)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        position_embeddings=None,
        observer=None,
        **kwargs,
    ):
        h_in = hidden_states
        attn_update = mlp_update = aux = None
        if hasattr(self, "self_attn"):
            attn_update, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attn_update
        if hasattr(self, "mlp"):
            mlp_update, aux = run_mlp(self.mlp, self.post_attention_layernorm(hidden_states), observer is not None)
            hidden_states = hidden_states + mlp_update
        if observer is not None:
            observer(self.layer_idx, "mlp", h_in, attn_update, mlp_update, aux)
        return hidden_states


def _register_checkpoint_names() -> None:
    """transformers renames Qwen2.5-VL's stored keys (``model.layers`` <-> ``model.language_model.layers``)
    only for its own classes; register the same renaming for our subclass, so a vanilla checkpoint
    loads into it and ours are saved in the vanilla layout."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    if get_checkpoint_conversion_mapping("QwenImageTextEncoder") is None:
        mapping = get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__)
        register_checkpoint_conversion_mapping("QwenImageTextEncoder", mapping)


class QwenImageTextEncoder(Qwen2_5_VLForConditionalGeneration):
    """Qwen-Image's text encoder (Qwen2.5-VL) with the decoder layers its config describes. Extra
    forward keyword ``observer`` reaches every decoder layer (through transformers' kwargs)."""

    config_class = QwenImageTextEncoderConfig
    config: QwenImageTextEncoderConfig
    _no_split_modules = ["StructuredDecoderLayer", "Qwen2_5_VLVisionBlock"]

    def __init__(self, config: QwenImageTextEncoderConfig):
        super().__init__(config)
        # transformers builds the default layers (on the meta device under from_pretrained: no cost);
        # replace them by the configured ones and initialise those like the rest
        n = config.text_config.num_hidden_layers
        self.model.language_model.layers = nn.ModuleList(StructuredDecoderLayer(config, i) for i in range(n))
        self.post_init()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language_model.layers


_register_checkpoint_names()


# --------------------------------------------------------------------------- generation: MMDiT


class MMDiTBlock(nn.Module):
    """One dual-stream block of Qwen-Image's MMDiT, holding only the sublayers it keeps (diffusers'
    weight names). Each stream's AdaLN modulation ``*_mod`` emits (shift, scale, gate) per kept
    sublayer, attention's first: a dropped sublayer's modulation rows are dropped with it."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        keep_attn: bool,
        mlps: dict,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.keep_attn = keep_attn
        self.keep_mlp = all(plan is not None for plan in mlps.values())
        n_mod = int(keep_attn) + int(self.keep_mlp)
        if n_mod:
            self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * n_mod * dim, bias=True))
            self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * n_mod * dim, bias=True))
        if keep_attn:
            self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
            self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
            self.attn = Attention(
                query_dim=dim,
                cross_attention_dim=None,
                added_kv_proj_dim=dim,
                dim_head=attention_head_dim,
                heads=num_attention_heads,
                out_dim=dim,
                context_pre_only=False,
                bias=True,
                processor=QwenDoubleStreamAttnProcessor2_0(),
                qk_norm="rms_norm",
                eps=eps,
            )
        if self.keep_mlp:
            self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
            self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
            for slot, (kind, arg) in mlps.items():
                setattr(self, slot, build_moe(dim, arg, "gelu") if kind == "moe" else QwenFeedForward(dim, arg))

    @staticmethod
    def modulate(x, params):
        shift, scale, gate = params.chunk(3, dim=-1)
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1), gate.unsqueeze(1)

    def forward(
        self,
        hidden_states,
        encoder_hidden_states,
        encoder_hidden_states_mask,
        temb,
        image_rotary_emb=None,
        observer=None,
        layer: int = 0,
    ):
        h = {"img": hidden_states, "txt": encoder_hidden_states}
        h_in = dict(h)
        attn_update = {"img": None, "txt": None}
        mlp_update = {"img": None, "txt": None}
        aux = {"img": None, "txt": None}
        if hasattr(self, "img_mod"):
            mods = {
                "img": self.img_mod(temb).chunk(int(self.keep_attn) + int(self.keep_mlp), dim=-1),
                "txt": self.txt_mod(temb).chunk(int(self.keep_attn) + int(self.keep_mlp), dim=-1),
            }
        if self.keep_attn:
            img_x, img_gate = self.modulate(self.img_norm1(h["img"]), mods["img"][0])
            txt_x, txt_gate = self.modulate(self.txt_norm1(h["txt"]), mods["txt"][0])
            img_out, txt_out = self.attn(
                hidden_states=img_x,
                encoder_hidden_states=txt_x,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                image_rotary_emb=image_rotary_emb,
            )
            attn_update = {"img": img_gate * img_out, "txt": txt_gate * txt_out}
            h = {s: h[s] + attn_update[s] for s in h}
        if self.keep_mlp:
            for s in ("img", "txt"):
                x, gate = self.modulate(getattr(self, f"{s}_norm2")(h[s]), mods[s][-1])
                out, aux[s] = run_mlp(getattr(self, f"{s}_mlp"), x, observer is not None)
                mlp_update[s] = gate * out
                h[s] = h[s] + mlp_update[s]
        if observer is not None:
            for s in ("img", "txt"):
                observer(layer, f"{s}_mlp", h_in[s], attn_update[s], mlp_update[s], aux[s])
        if h["img"].dtype == torch.float16:  # as upstream: keep fp16 finite
            h = {s: v.clip(-65504, 65504) for s, v in h.items()}
        return h["txt"], h["img"]


def modulation_rows(dim: int, kept_from: tuple[bool, bool], kept_to: tuple[bool, bool]) -> torch.Tensor:
    """Row indices of an ``*_mod`` linear with sublayers ``kept_from`` (attn, mlp) that a block keeping
    ``kept_to`` retains (3 * dim rows per kept sublayer, attention first)."""
    rows, start = [], 0
    for was, stays in zip(kept_from, kept_to):
        if was:
            if stays:
                rows.append(torch.arange(start, start + 3 * dim))
            start += 3 * dim
        elif stays:
            raise ValueError("a dropped sublayer cannot come back")
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


class QwenImageMMDiT(QwenImageTransformer2DModel):
    """Qwen-Image's MMDiT with the blocks its config describes (``skip``, ``mlp_widths``, ``moe``,
    ``moe_slots`` recorded by ``register_to_config``), and an ``observer`` argument in ``forward``.
    Qwen-Image-Edit's variants (``zero_cond_t``, extra t-conditioning) are not supported."""

    _no_split_modules = ["MMDiTBlock"]
    _repeated_blocks = ["MMDiTBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        skip: dict | None = None,
        mlp_widths: dict | None = None,
        moe: dict | None = None,
        moe_slots: list | None = None,
    ):
        if zero_cond_t or use_additional_t_cond or guidance_embeds:
            raise NotImplementedError("QwenImageMMDiT supports the text-to-image model only")
        # the parent builds everything but the blocks (num_layers=0); the blocks come from the structure
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=0,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            axes_dims_rope=axes_dims_rope,
            use_layer3d_rope=use_layer3d_rope,
        )
        skip, mlp_widths, moe, moe_slots = normalise_structure(skip, mlp_widths, moe, moe_slots, GEN_SLOTS, num_layers)
        self.register_to_config(num_layers=num_layers, skip=skip, mlp_widths=mlp_widths, moe=moe, moe_slots=moe_slots)
        self.transformer_blocks = nn.ModuleList(
            MMDiTBlock(
                self.inner_dim,
                num_attention_heads,
                attention_head_dim,
                keep_attn=i not in skip["attn"],
                mlps={s: self.mlp_plan(i, s) for s in GEN_SLOTS},
            )
            for i in range(num_layers)
        )

    @property
    def default_mlp_width(self) -> int:
        return 4 * self.inner_dim  # diffusers' FeedForward default (mult 4)

    def mlp_plan(self, layer: int, slot: str):
        c = self.config
        return mlp_plan(c.skip, c.mlp_widths, c.moe, c.moe_slots, slot, layer, self.default_mlp_width)

    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        timestep=None,
        img_shapes=None,
        attention_kwargs=None,
        return_dict: bool = True,
        observer=None,
        **unused,
    ):
        """Upstream's forward for text-to-image, with ``observer`` handed to every block."""
        if unused.get("guidance") is not None or unused.get("controlnet_block_samples") is not None:
            raise NotImplementedError("guidance embeddings and controlnets are not supported")
        hidden_states = self.img_in(hidden_states)
        timestep = timestep.to(hidden_states.dtype)
        encoder_hidden_states = self.txt_in(self.txt_norm(encoder_hidden_states))
        text_seq_len, _, encoder_hidden_states_mask = compute_text_seq_len_from_mask(
            encoder_hidden_states, encoder_hidden_states_mask
        )
        temb = self.time_text_embed(timestep, hidden_states)
        rope = self.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)
        for i, block in enumerate(self.transformer_blocks):
            args = (hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, rope, observer, i)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                encoder_hidden_states, hidden_states = block(*args)
        output = self.proj_out(self.norm_out(hidden_states, temb))
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


# --------------------------------------------------------------------------- rebuild


def restructured(old: nn.Module, structure: dict, replace: dict) -> nn.Module:
    """A copy of a component (``QwenImageTextEncoder`` or ``QwenImageMMDiT``) built with ``structure``
    (its ``skip``, ``mlp_widths``, ``moe``, ``moe_slots``): every weight the new structure keeps is
    carried over exactly, ``replace``'s MLPs (``{(layer, slot): MLPWeights or an MoE block}``) are
    swapped in, and in the MMDiT a dropped sublayer's modulation rows go with it."""
    text = isinstance(old, QwenImageTextEncoder)
    with torch.device(old.device), default_dtype(old.dtype):
        if text:
            new = QwenImageTextEncoder(type(old.config).from_dict({**old.config.to_dict(), **structure}))
        else:
            new = QwenImageMMDiT.from_config({**old.config, **structure})
    old_state = old.state_dict()
    state = {}
    for key in new.state_dict():
        if key in old_state:
            state[key] = old_state[key]
    layers = new.decoder_layers if text else new.transformer_blocks
    for (layer, slot), value in replace.items():
        prefix = f"model.language_model.layers.{layer}.mlp." if text else f"transformer_blocks.{layer}.{slot}."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        target = getattr(layers[layer], slot)
        sub = mlp_state(target, value) if isinstance(value, MLPWeights) else value.state_dict()
        state.update({prefix + k: v for k, v in sub.items()})
    if not text:
        _slice_modulation(old, new, state)
    new.load_state_dict(state, strict=True)
    for name, buf in old.named_buffers():  # non-persistent buffers (rotary tables) as they were
        target = new.get_buffer(name) if _has_buffer(new, name) else None
        if target is not None and target.shape == buf.shape:
            target.data = buf.detach().clone()
    return new.eval()


def _slice_modulation(old: QwenImageMMDiT, new: QwenImageMMDiT, state: dict) -> None:
    """Carry each block's AdaLN rows of the sublayers it keeps (a dropped sublayer's go)."""
    dim = new.inner_dim
    for i, (a, b) in enumerate(zip(old.transformer_blocks, new.transformer_blocks)):
        if not hasattr(b, "img_mod"):
            continue
        rows = modulation_rows(dim, (a.keep_attn, a.keep_mlp), (b.keep_attn, b.keep_mlp))
        for stream in ("img_mod", "txt_mod"):
            for p in ("weight", "bias"):
                key = f"transformer_blocks.{i}.{stream}.1.{p}"
                state[key] = getattr(getattr(a, stream)[1], p)[rows.to(state[key].device)]


def _has_buffer(module: nn.Module, name: str) -> bool:
    try:
        module.get_buffer(name)
        return True
    except AttributeError:
        return False


# --------------------------------------------------------------------------- latents


def pack_latents(latents):
    """[B, C, 1, h, w] VAE latents -> [B, (h/2)(w/2), 4C] tokens of 2x2 patches (the pipeline's order)."""
    B, C, _, h, w = latents.shape
    x = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens, h: int, w: int):
    """Inverse of ``pack_latents`` for an (h, w) latent grid."""
    B, _, D = tokens.shape
    x = tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, 1, h, w)


def resize_images(images, size: tuple[int, int], mode: str = "bilinear"):
    """[B, H, W, 3] -> [B, h, w, 3] (antialiased; a no-op at the same size)."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    x = images.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1)
