"""The Qwen-Image family: a Qwen2.5-VL text encoder (``und``) and an MMDiT (``gen``) around a video VAE.

The understanding component is the text encoder, which as a Qwen2.5-VL model also answers questions
about images (the understanding task); the generation component is the MMDiT. This adapter names the
structure (components, layers, MLP slots, skip lists, rebuild), which lives in the component configs
(``models.qwen_image``), and delegates the rest to the model side: the files of a model directory
(diffusers' pipeline layout plus ``SHA256SUMS``) and both tasks (Qwen2-VL's image preprocessing,
prompt encoding, the flow-matching sampler, the flow loss) are ``models.qwen_image_pipeline``'s.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from ..choices import COMPONENTS, SUBLAYERS
from ..models.blocks import MLPWeights
from ..models.qwen_image import (
    GEN_SLOTS,
    UND_SLOTS,
    QwenImageMMDiT,
    QwenImageTextEncoder,
    dense_mlp_weights,
    restructured,
)
from ..models.qwen_image_pipeline import (
    PIPELINE_CLASS,
    UND_GRID,
    QwenImageModel,
    QwenImageTasks,
    TokenizerAdapter,
    check_settings,
    is_pipeline_dir,
    load_pipeline,
    save_pipeline,
)
from .base import Family, ImageGeometry


class QwenImageFamily(Family):
    """Adapter for Qwen-Image (see the module docstring); ``settings`` override the pipeline's
    ``SETTINGS_DEFAULTS``."""

    name = "qwen_image"
    components = COMPONENTS

    def __init__(self, model: QwenImageModel, tokenizer, scheduler_config: dict, settings: dict | None = None):
        if not isinstance(tokenizer, TokenizerAdapter):
            tokenizer = TokenizerAdapter(tokenizer)
        super().__init__(model, tokenizer)
        self.scheduler_config = dict(scheduler_config)
        self.settings = check_settings(settings)

    @property
    def text_encoder(self) -> QwenImageTextEncoder:
        return self.model.text_encoder

    @property
    def transformer(self) -> QwenImageMMDiT:
        return self.model.transformer

    @property
    def vae(self):
        return self.model.vae

    @property
    def tasks(self) -> QwenImageTasks:
        """The pipeline work on the current model (made on each use, so ``with_model``'s twin runs its own)."""
        return QwenImageTasks(self.model, self.tokenizer, self.scheduler_config, self.settings)

    # ------------------------------------------------------------------ files
    @classmethod
    def is_model_dir(cls, path) -> bool:
        return is_pipeline_dir(path)

    @classmethod
    def load(
        cls, model_dir, device=None, dtype=None, settings: dict | None = None, require_manifest: bool = True
    ) -> "QwenImageFamily":
        """Load a model directory of this family strictly (``load_pipeline``; ``require_manifest`` False
        reads a raw ``Qwen/Qwen-Image`` snapshot); ``settings`` override the stored ones."""
        model, tokenizer, scheduler_config, stored = load_pipeline(model_dir, device, dtype, require_manifest)
        return cls(model, tokenizer, scheduler_config, {**stored, **(settings or {})})

    @classmethod
    def load_empty(cls, model_dir, dtype=None) -> "QwenImageFamily":
        from ..models.qwen_image_pipeline import empty_pipeline

        model, tokenizer, scheduler_config, stored = empty_pipeline(model_dir, dtype)
        return cls(model, tokenizer, scheduler_config, stored)

    def shard_units(self) -> list:
        """The MMDiT's blocks (under its root) and the text encoder's decoder layers (each its own
        root: the frozen text path calls its embedding and decoder stack separately, so its
        embedding, vision tower and head stay whole on every rank)."""
        return list(self.text_encoder.decoder_layers) + list(self.transformer.transformer_blocks)

    def shard_roots(self) -> list:
        return [(self.transformer, ())]

    @classmethod
    def weight_layout(cls) -> list:
        # the text encoder's files keep Qwen2.5-VL's names (``model.layers``, ``visual``), which
        # transformers maps to ``model.language_model`` / ``model.visual`` when loading
        text = (("model.language_model.", "model."), ("model.visual.", "visual."))
        return [
            ("text_encoder.", "text_encoder", "model", text),
            ("transformer.", "transformer", "diffusion_pytorch_model", ()),
            ("vae.", "vae", "diffusion_pytorch_model", ()),
        ]

    def save_metadata(self, out_dir) -> None:
        from ..models.qwen_image_pipeline import save_pipeline_metadata

        save_pipeline_metadata(out_dir, self.model, self.tokenizer.hf, self.scheduler_config, self.settings, self.name)

    def save(self, out_dir, extra_files=()) -> None:
        save_pipeline(
            out_dir, self.model, self.tokenizer.hf, self.scheduler_config, self.settings, self.name, extra_files
        )

    # ------------------------------------------------------------------ structure
    def _module(self, component: str):
        return self.text_encoder if self.check_component(component) == "und" else self.transformer

    def _structure(self, component: str) -> dict:
        m = self._module(component)
        c = m.config
        return {
            "skip": {s: list(v) for s, v in c.skip.items()},
            "mlp_widths": {s: list(v) for s, v in c.mlp_widths.items()},
            "moe": copy.deepcopy(c.moe),
            "moe_slots": None if c.moe_slots is None else list(c.moe_slots),
        }

    def _layers(self, component: str) -> nn.ModuleList:
        m = self._module(component)
        return m.decoder_layers if component == "und" else m.transformer_blocks

    def num_layers(self, component: str) -> int:
        return len(self._layers(component))

    def mlp_slots(self, component: str) -> tuple[str, ...]:
        return UND_SLOTS if self.check_component(component) == "und" else GEN_SLOTS

    def _slot(self, component: str, slot: str | None) -> str:
        slots = self.mlp_slots(component)
        slot = slots[0] if slot is None else slot
        if slot not in slots:
            raise ValueError(f"unknown MLP slot {slot!r} of {component}; expected one of {slots}")
        return slot

    def mlp(self, component: str, layer: int, slot: str | None = None) -> nn.Module | None:
        return getattr(self._layers(component)[layer], self._slot(component, slot), None)

    def mlp_weights(self, component: str, layer: int, slot: str | None = None) -> MLPWeights | None:
        module = self.mlp(component, layer, slot)
        return None if module is None else dense_mlp_weights(module)

    def default_mlp_width(self, component: str) -> int:
        if self.check_component(component) == "und":
            return self.text_encoder.config.text_config.intermediate_size
        return self.transformer.default_mlp_width

    def skipped(self, component: str) -> dict[str, list[int]]:
        return self._structure(component)["skip"]

    def moe_spec(self, component: str) -> dict | None:
        return self._structure(component)["moe"]

    def sublayer_output_parameters(self, component: str, sublayer: str, layer: int) -> list[nn.Parameter]:
        if sublayer not in SUBLAYERS:
            raise ValueError(f"unknown sublayer {sublayer!r}; expected one of {SUBLAYERS}")
        block = self._layers(component)[layer]
        if sublayer == "attn":
            if component == "und":
                projections = [block.self_attn.o_proj] if hasattr(block, "self_attn") else []
            else:
                projections = [block.attn.to_out[0], block.attn.to_add_out] if hasattr(block, "attn") else []
            return [p for proj in projections for p in (proj.weight, proj.bias) if p is not None]
        params = []
        for slot in self.mlp_slots(component):
            module = getattr(block, slot, None)
            if module is None:
                continue
            if dense_mlp_weights(module) is not None:
                out = module.down_proj if component == "und" else module.net[2]
                params += [p for p in (out.weight, out.bias) if p is not None]
            else:  # an MoE block: every expert's down projection and the output bias
                params += [p for n, p in module.named_parameters() if "down" in n]
        return params

    def parameter_component(self, name: str) -> str:
        if name.startswith("text_encoder."):
            return "und"
        if name.startswith("transformer."):
            return "gen"
        return "shared"

    def in_layers(self, name: str) -> bool:
        return name.startswith(("text_encoder.model.language_model.layers.", "transformer.transformer_blocks."))

    def describe(self) -> dict:
        text = self.text_encoder.config.text_config
        tr = self.transformer.config
        return {
            "family": self.name,
            "image_size": list(self.settings["image_size"]),
            "und": {
                "layers": text.num_hidden_layers,
                "hidden_size": text.hidden_size,
                "mlp_width": text.intermediate_size,
                **self._structure("und"),
            },
            "gen": {
                "layers": tr.num_layers,
                "hidden_size": self.transformer.inner_dim,
                "mlp_width": self.transformer.default_mlp_width,
                **self._structure("gen"),
            },
        }

    # ------------------------------------------------------------------ rebuild
    def rebuild(
        self, skip: dict | None = None, mlps: dict | None = None, moe: dict | None = None, **options
    ) -> "QwenImageFamily":
        if options:
            raise ValueError(f"the qwen_image family has no rebuild options; got {sorted(options)}")
        skip, mlps, moe = skip or {}, mlps or {}, moe or {}
        for key in list(skip) + list(moe) + [k[0] for k in mlps]:
            self.check_component(key)
        parts = {}
        for c in self.components:
            replace = {(layer, self._slot(c, slot)): v for (comp, layer, slot), v in mlps.items() if comp == c}
            structure = self._new_structure(c, skip.get(c), replace, moe.get(c))
            parts[c] = restructured(self._module(c), structure, replace)
        model = QwenImageModel(parts["und"], parts["gen"], copy.deepcopy(self.vae)).eval()
        model.train(self.model.training)
        return type(self)(model, self.tokenizer, self.scheduler_config, self.settings)

    def _new_structure(self, component: str, skip, replace: dict, moe_spec) -> dict:
        """The structure after a rebuild: the new skip lists, widths of replaced dense MLPs, and the
        MoE places (which must be the recorded layers times slots)."""
        s = self._structure(component)
        n, default = self.num_layers(component), self.default_mlp_width(component)
        if skip is not None:
            if set(skip) - set(SUBLAYERS):
                raise ValueError(
                    f"{component}: unknown sublayers {sorted(set(skip) - set(SUBLAYERS))} in skip; "
                    f"expected {SUBLAYERS} (a dropped block is in both lists)"
                )
            new_skip = {sub: sorted(int(i) for i in skip.get(sub, [])) for sub in SUBLAYERS}
            back = {sub: sorted(set(s["skip"][sub]) - set(new_skip[sub])) for sub in SUBLAYERS}
            if any(back.values()):
                raise ValueError(f"{component}: dropped sublayers cannot come back: {back}")
            s["skip"] = new_skip
        for (layer, slot), value in replace.items():
            if not 0 <= layer < n:
                raise ValueError(f"{component} has no layer {layer}")
            if layer in s["skip"]["mlp"]:
                raise ValueError(f"{component} layer {layer}: its MLP is dropped and cannot be replaced")
        widths = {slot: list(s["mlp_widths"].get(slot, [default] * n)) for slot in self.mlp_slots(component)}
        moe_places = set()
        if s["moe"] is not None:
            moe_places = {(i, slot) for i in s["moe"]["layers"] for slot in s["moe_slots"]}
        for (layer, slot), value in replace.items():
            if isinstance(value, MLPWeights):
                widths[slot][layer] = value.width
                moe_places.discard((layer, slot))
            else:
                moe_places.add((layer, slot))
        moe_places = {(i, slot) for i, slot in moe_places if i not in s["skip"]["mlp"]}
        s["mlp_widths"] = widths if any(w != [default] * n for w in widths.values()) else {}
        if moe_places:
            spec = dict(moe_spec if moe_spec is not None else s["moe"] or {})
            if not spec:
                raise ValueError(f"{component}: MoE blocks given without an MoE spec (rebuild's moe)")
            layers = sorted({i for i, _ in moe_places})
            slots = [slot for slot in self.mlp_slots(component) if any(p[1] == slot for p in moe_places)]
            if moe_places != {(i, slot) for i in layers for slot in slots}:
                raise ValueError(f"{component}: MoE blocks must fill the same slots {slots} of every MoE layer")
            if "layers" in spec and moe_spec is not None and sorted(spec["layers"]) != layers:
                raise ValueError(f"{component}: moe spec layers {spec['layers']} differ from the MoE blocks' {layers}")
            # the experts' kind is the component's (a spec made without one says swiglu)
            kind = "swiglu" if component == "und" else "gelu"
            s["moe"], s["moe_slots"] = {**spec, "layers": layers, "activation": kind}, slots
        else:
            s["moe"], s["moe_slots"] = None, None
        return s

    # ------------------------------------------------------------------ tasks (the pipeline's)
    @property
    def image_geometry(self) -> ImageGeometry:
        """One square of ``und_image_size`` pixels on the grid of Qwen2-VL's merged patches
        (``UND_GRID``), which its processor keeps as is: benchmarks letterbox their images to it."""
        size = int(self.settings["und_image_size"])
        return ImageGeometry("letterbox", size, UND_GRID, size // UND_GRID)

    def understanding_logits(self, images, question_ids, observer=None):
        return self.tasks.understanding_logits(images, question_ids, observer)

    def generate_images(self, prompt_ids, seeds, observer=None, **sampler):
        return self.tasks.generate_images(prompt_ids, seeds, observer, **sampler)

    def noise_shape(self, n: int) -> tuple[int, ...]:
        return self.tasks.noise_shape(n)

    def flow_loss(self, prompt_ids, images, cond_keep=None, noise=None, t=None, observer=None):
        return self.tasks.flow_loss(prompt_ids, images, cond_keep=cond_keep, noise=noise, t=t, observer=observer)

    @property
    def training_size(self) -> tuple[int, int]:
        return tuple(self.tasks.sample_size)

    def latent_moments(self, images):
        return self.tasks.latent_moments(images)

    def decode_latents(self, tokens):
        return self.tasks.decode_latents(tokens)

    def velocity_at(self, prompt_ids, x_t, t, cond_keep=None, observer=None):
        return self.tasks.velocity_at(prompt_ids, x_t, t, cond_keep=cond_keep, observer=observer)

    def codec(self):
        return self.vae

    def codec_description(self) -> dict:
        # without the config's bookkeeping (``_name_or_path`` is where it was loaded from)
        vae = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        return {**super().codec_description(), "vae": vae}

    def encode_prompts(self, prompt_ids, observer=None):
        """Prompt embeddings [B, T, H] and their bool mask (``QwenImageTasks.encode_prompts``)."""
        return self.tasks.encode_prompts(prompt_ids, observer)

    # the pipeline's input builders, which the parity tests compare with transformers' own forward
    def _pixel_inputs(self, images):
        return self.tasks.pixel_inputs(images)

    def _template_ids(self, template: str, *fields: str) -> list[list[int]]:
        return self.tasks.template_ids(template, *fields)

    def _pad(self, sequences: list[list[int]]):
        return self.tasks.pad(sequences)


def import_qwen_image(src, out, device=None, dtype=None, settings: dict | None = None) -> Path:
    """Read a diffusers ``Qwen/Qwen-Image`` snapshot strictly (safetensors only, every weight present
    and of the right shape) and write it as a model directory of this family. A snapshot has no
    ``SHA256SUMS`` (``fetch-checkpoint`` verified it against its lock); the written directory has one."""
    src = Path(src)
    if not QwenImageFamily.is_model_dir(src):
        raise FileNotFoundError(f"{src} is not a {PIPELINE_CLASS} snapshot (model_index.json)")
    family = QwenImageFamily.load(src, device=device, dtype=dtype, settings=settings, require_manifest=False)
    family.save(out)
    return Path(out)
