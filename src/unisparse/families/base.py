"""The family adapter: the one interface through which the algorithms see a model.

Calibration, depth and width pruning, expert partitioning, MoE tuning and evaluation never import a
modeling file, never spell a weight name and never read a model's config: they ask a ``Family``.
A family wraps one loaded model and says

* **structure**: its component names (``components``; the study's ``und`` / ``gen``), the number of
  layers of each, each layer's sublayers (``SUBLAYERS``: attention, MLP) and, per layer, its MLP
  slots (``mlp_slots``: the MoT has one MLP per tower and layer, an MMDiT block one per stream);
  each dense MLP's weights as ``models.blocks.MLPWeights`` (kind ``swiglu`` or ``gelu``) and the
  MoE blocks it holds;
* **rebuild**: a new family with changed structure (sublayers skipped, MLPs replaced by narrower ones
  or by MoE blocks), weights carried over exactly, whose saved form reloads with ``load`` alone;
* **tasks**: understanding (answer logits for images and questions) and generation (sampling, the
  rectified-flow loss), each streaming per-layer tensors to an optional ``LayerObserver``, and the
  ``ImageGeometry`` an understanding benchmark sizes its images by.

Families register themselves in ``families/__init__.py``; ``load_family`` picks one from what a model
directory holds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..choices import COMPONENTS
from ..models.blocks import MLPWeights

#: how an understanding benchmark resizes its images (``ImageGeometry.resize``)
RESIZES = ("navit", "letterbox")


@dataclass(frozen=True)
class ImageGeometry:
    """How an understanding benchmark sizes its images for a model (``evaluate.mme``'s transforms).

    ``resize``: ``navit`` (each image at its own resolution, the long side capped at ``image_size``
    pixels and at ``max_patches_per_side`` patches: a SigLIP-NaViT tower) or ``letterbox`` (one square
    of ``image_size`` pixels, the image centred on a grey canvas); ``patch_size``: the pixel grid
    both sides (and the letterbox's offset) are multiples of."""

    resize: str
    image_size: int
    patch_size: int
    max_patches_per_side: int

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ValueError(f"image geometry: resize {self.resize!r} is not one of {RESIZES}")
        for name in ("image_size", "patch_size", "max_patches_per_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"image geometry: {name} must be a positive integer, not {value!r}")

    @classmethod
    def from_mot_config(cls, config) -> "ImageGeometry":
        """The geometry a MoT config spells (``vision``, ``vit_image_size``, ``vit_patch_size``,
        ``vit_max_num_patch_per_side``): the one place these field names are read."""
        size, patch = int(config.vit_image_size), int(config.vit_patch_size)
        resize = "navit" if getattr(config, "vision", None) == "siglip_navit" else "letterbox"
        side = getattr(config, "vit_max_num_patch_per_side", None)
        return cls(resize, size, patch, int(side) if side is not None else size // patch)

    @classmethod
    def of(cls, source) -> "ImageGeometry":
        """The geometry of ``source``: an ``ImageGeometry``, a family (``image_geometry``), an object
        with an ``image_config`` (the interface before this type), or a MoT-style config (library
        callers passing ``model.config``)."""
        if isinstance(source, ImageGeometry):
            return source
        for attribute in ("image_geometry", "image_config"):
            found = getattr(source, attribute, None)
            if found is not None:
                return cls.of(found)
        if hasattr(source, "vit_image_size") and hasattr(source, "vit_patch_size"):
            return cls.from_mot_config(source)
        raise TypeError(f"no image geometry in a {type(source).__name__}: give an ImageGeometry or a Family")


class LayerObserver(Protocol):
    """Receives, per layer and component, the rows of the residual stream that component computes.

    ``attn_update`` / ``mlp_update`` are the sublayers' additions to the stream (after any gating; None
    where the sublayer is skipped). ``mlp_aux`` holds the MLP's neuron activations (``act`` [n, I],
    dense) or its router outputs (``router_logits``, ``expert_idx``, ``expert_weights``; MoE), and
    ``slot`` when the layer has several MLPs (an MMDiT block calls ``on_layer`` once per stream);
    without ``slot`` it is the component's first slot.
    """

    def on_layer(self, layer: int, component: str, h_in, attn_update, mlp_update, mlp_aux) -> None: ...


class Family:
    """Base class of the adapters; subclasses fill in every method that raises here."""

    #: registry name, recorded in what the pipeline writes (e.g. ``mot``, ``qwen_image``)
    name: str = ""
    #: what a component is called in the study; the order is the canonical one
    components: tuple[str, ...] = COMPONENTS
    #: the family-specific keywords ``rebuild`` accepts (the MoT's ``skipped_attention_kv``)
    options: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, tokenizer=None):
        self.model = model  # the nn.Module holding every weight (training and accounting iterate it)
        self.tokenizer = tokenizer  # .encode(text) -> ids, .decode(ids) -> text

    # ------------------------------------------------------------------ files (the registry's calls)
    @classmethod
    def is_model_dir(cls, path) -> bool:
        """Whether ``path`` holds a model directory of this family (read cheaply: no weights)."""
        raise NotImplementedError

    @classmethod
    def load(cls, model_dir, device=None, dtype=None) -> "Family":
        """The model directory on ``device`` in ``dtype`` (None: the stored dtype), verified, with the
        tokenizer that travels with it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: that of its frozen weights where some are (a sharded run keeps its
        trainable ones as fp32 master weights), else of its first parameter."""
        frozen = (p.dtype for p in self.model.parameters() if p.is_floating_point() and not p.requires_grad)
        return next(frozen, None) or next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ sharding (FSDP2)
    @classmethod
    def load_empty(cls, model_dir, dtype=None) -> "Family":
        """The family of ``model_dir`` with every parameter on the meta device (buffers real) and
        the files' headers checked against it: what a rank of a sharded run starts from (it then
        reads only its own rows, ``sharding.WeightFiles``)."""
        raise NotImplementedError(f"the {cls.name} family cannot be loaded sharded")

    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one (decoder layers, transformer blocks): each is gathered
        alone in forward, backward and when the model is written."""
        raise NotImplementedError(f"the {self.name} family names no shardable blocks")

    def shard_roots(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """The modules sharded last, holding what no unit holds, with the methods other than
        ``forward`` that run a pass through them (FSDP2 must unshard for those too)."""
        return [(self.model, ())]

    @classmethod
    def weight_layout(cls) -> list[tuple[str, str, str, tuple]]:
        """``[(state-dict name prefix, sub-directory, file stem, renames)]``: where a saved model
        directory keeps each part's safetensors (the stem of ``<stem>-0000i-of-0000n.safetensors``)
        and ``renames``, ``(in-memory prefix, stored prefix)`` pairs where the files name a tensor
        otherwise than the module does."""
        return [("", ".", "model", ())]

    def save_metadata(self, out_dir) -> None:
        """Everything of a saved model directory except its weights and tokenizer files (configs,
        index files): what ``sharding.save_sharded`` writes beside the weights it streams."""
        raise NotImplementedError(f"the {self.name} family cannot be written sharded")

    def with_model(self, model: nn.Module) -> "Family":
        """The same adapter around another instance of the same model (the training loop's sharded
        twin): every method reads the model through ``self.model``."""
        twin = copy.copy(self)
        twin.model = model
        return twin

    def eval(self) -> "Family":
        self.model.eval()
        return self

    def check_component(self, component: str) -> str:
        if component not in self.components:
            raise ValueError(f"unknown component {component!r}; the {self.name} family has {self.components}")
        return component

    # ------------------------------------------------------------------ structure
    def num_layers(self, component: str) -> int:
        raise NotImplementedError

    def mlp_slots(self, component: str) -> tuple[str, ...]:
        """Names of the MLPs of one layer of ``component`` (the first one is the default slot)."""
        return ("mlp",)

    def mlp(self, component: str, layer: int, slot: str | None = None) -> nn.Module | None:
        """The MLP module at that place (dense or MoE), None where depth pruning dropped it."""
        raise NotImplementedError

    def mlp_weights(self, component: str, layer: int, slot: str | None = None) -> MLPWeights | None:
        """The dense MLP's weights, None where it was dropped or is an MoE block."""
        raise NotImplementedError

    def mlp_places(self, component: str) -> list[tuple[int, str]]:
        """(layer, slot) of every MLP the component still has, in layer then slot order."""
        return [
            (i, s)
            for i in range(self.num_layers(component))
            for s in self.mlp_slots(component)
            if self.mlp(component, i, s) is not None
        ]

    def skipped(self, component: str) -> dict[str, list[int]]:
        """``{sublayer: [layers]}`` already dropped from ``component``."""
        raise NotImplementedError

    def moe_spec(self, component: str) -> dict | None:
        """The MoE spec of ``component`` (``layers``, ``num_experts``, ``top_k``, ...), None if dense."""
        raise NotImplementedError

    def rebuild(
        self, skip: dict | None = None, mlps: dict | None = None, moe: dict | None = None, **options
    ) -> "Family":
        """A new family of the same kind with changed structure and every other weight copied exactly.

        ``skip``: ``{component: {sublayer: [layers]}}``, the complete new skip lists; ``mlps``:
        ``{(component, layer, slot): MLPWeights | MoE block}`` replacing those MLPs (a narrower dense
        MLP or an MoE block); ``moe``: ``{component: spec}`` recorded for components made MoE;
        ``options``: family-specific settings (the MoT's ``skipped_attention_kv``). The result's saved
        form must reload with ``load`` and compute the same outputs."""
        raise NotImplementedError

    def sublayer_output_parameters(self, component: str, sublayer: str, layer: int) -> list[nn.Parameter]:
        """Parameters whose zeroing makes that sublayer add nothing to the stream (its output
        projections and their biases): what lets a test check that dropping equals zeroing."""
        raise NotImplementedError

    def parameter_component(self, name: str) -> str:
        """The component a parameter (``model.named_parameters()`` name) belongs to, or ``shared``."""
        raise NotImplementedError

    def in_layers(self, name: str) -> bool:
        """Whether a parameter sits in a component's layers (what FLOPs per token counts)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What the metrics record of the model besides parameter counts (family, sizes)."""
        return {"family": self.name}

    @property
    def image_geometry(self) -> ImageGeometry:
        """How an understanding benchmark sizes its images for this model (see ``ImageGeometry``)."""
        raise NotImplementedError(f"the {self.name} family does not say how its understanding images are sized")

    # ------------------------------------------------------------------ tasks
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def understanding_logits(self, images, question_ids, observer=None):
        """Next-token logits [B, V] after each image + question (a list of token id lists)."""
        raise NotImplementedError

    def generate_images(self, prompt_ids, seeds, observer=None, **sampler):
        """Images [B, H, W, 3] in [0, 1] for prompts (token id lists), one seed each; ``sampler``:
        ``num_steps``, ``cfg_scale``, ``cfg_interval``, ``cfg_renorm``, ``cfg_renorm_min`` (and
        ``shift`` where the family has one)."""
        raise NotImplementedError

    @property
    def default_shift(self) -> float | None:
        """The timestep shift ``generate_images`` uses when none is given (recorded by calibration);
        None for a family whose sampler has no shift setting."""
        return None

    def noise_shape(self, n: int) -> tuple[int, ...]:
        """Shape of the noise ``flow_loss`` takes for n images."""
        raise NotImplementedError

    def flow_loss(self, prompt_ids, images, cond_keep=None, noise=None, t=None, observer=None):
        """Rectified-flow loss (fp32 scalar) of the generation component on (prompt, image) pairs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ tuning data (pre-encoded latents)
    @property
    def training_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images ``flow_loss`` and ``latent_moments`` take."""
        raise NotImplementedError(f"the {self.name} family does not say its training resolution")

    def latent_moments(self, images):
        """The codec's posterior of images [B, H, W, 3] in [0, 1] at ``training_size``: (mean, std),
        fp32 latent tokens of ``noise_shape``'s shape each (std zero for a deterministic codec). A
        training target is ``mean + std * noise`` (sampled) or ``mean``."""
        raise NotImplementedError(f"the {self.name} family cannot pre-encode images")

    def decode_latents(self, tokens):
        """Latent tokens -> images [B, H, W, 3] in [0, 1] (what the sampler does with its last state)."""
        raise NotImplementedError(f"the {self.name} family cannot decode latents")

    def velocity_at(self, prompt_ids, x_t, t, cond_keep=None, observer=None):
        """The generation component's predicted velocity (fp32, ``x_t``'s shape) at noised latent tokens
        ``x_t`` and times ``t`` [B] after each prompt; ``cond_keep`` False drops that sample's prompt.
        The flow loss on pre-encoded latents and the distillation loss are both built on it."""
        raise NotImplementedError(f"the {self.name} family has no velocity forward")

    def codec(self) -> nn.Module | None:
        """The image codec's module (None for a codec without weights); see ``codec_digest``."""
        return None

    def codec_digest(self) -> str:
        """Identity of the codec that encodes training latents: sha256 of its weights as loaded (name,
        dtype, shape, bytes) and of the family's codec description. Latents prepared by one codec
        must never train a model whose codec differs."""
        import hashlib
        import json

        h = hashlib.sha256(json.dumps(self.codec_description(), sort_keys=True, default=str).encode())
        module = self.codec()
        for name, tensor in sorted((module.state_dict() if module is not None else {}).items()):
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def codec_description(self) -> dict:
        """What identifies the codec besides its weights (kind and latent geometry)."""
        return {"family": self.name, "training_size": list(self.training_size), "latent": list(self.noise_shape(1))}

    # ------------------------------------------------------------------ files
    def save(self, out_dir, extra_files=()) -> None:
        """Write the model atomically (with a ``SHA256SUMS`` manifest) so that ``load`` reads it back."""
        raise NotImplementedError
