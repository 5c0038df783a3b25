"""The MoT family: BAGEL-7B-MoT and the tiny default (``models.modeling_mot``).

Components are the two towers of every decoder layer (``und``: text and ViT tokens; ``gen``: noised
latent tokens), one SwiGLU MLP per tower and layer. Structure lives in ``MoTConfig`` (``skip``,
``mlp_widths``, ``moe``, ``skipped_attention_kv``); a rebuild is a new config plus the old state dict
with the replaced MLPs' entries swapped, so every derived model is ``MoTForUnifiedModel`` again.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..choices import COMPONENTS
from ..io import read_json, save_model
from ..models.blocks import MLPWeights, SwiGLUMLP
from ..models.configuration_mot import SUFFIX, MoTConfig
from ..models.loading import load_model
from ..models.modeling_mot import MoTForUnifiedModel
from .base import Family, ImageGeometry

LAYERS_PREFIX = "language_model.model.layers."
#: the model's methods that run a pass without calling ``forward`` (a sharded run unshards for them)
FORWARD_METHODS = ("flow_loss", "velocity_at", "understanding_logits", "generate_images")


class MoTFamily(Family):
    name = "mot"
    components = COMPONENTS
    #: the joint attention's rule for a dropped und attention sublayer (keep the prompt's K/V or not)
    options = ("skipped_attention_kv",)

    @classmethod
    def is_model_dir(cls, path) -> bool:
        config = Path(path) / "config.json"
        return config.is_file() and read_json(config).get("model_type") == MoTConfig.model_type

    @classmethod
    def load(cls, model_dir, device=None, dtype=None, tokenizer=None) -> "MoTFamily":
        """``tokenizer`` None: the one that travels with the directory (``text.tokenizer_for``)."""
        from ..text import tokenizer_for

        return cls(load_model(model_dir, device=device, dtype=dtype), tokenizer or tokenizer_for(model_dir))

    @classmethod
    def load_empty(cls, model_dir, dtype=None) -> "MoTFamily":
        from ..models.loading import empty_model
        from ..text import tokenizer_for

        return cls(empty_model(model_dir, dtype), tokenizer_for(model_dir))

    def shard_units(self) -> list:
        return list(self.model.layers)

    def shard_roots(self) -> list:
        return [(self.model, FORWARD_METHODS)]

    def save_metadata(self, out_dir) -> None:
        self.model.config.save_pretrained(out_dir)

    @property
    def config(self) -> MoTConfig:
        return self.model.config

    # ------------------------------------------------------------------ structure
    def num_layers(self, component: str) -> int:
        self.check_component(component)
        return self.config.num_hidden_layers

    def mlp(self, component: str, layer: int, slot: str | None = None):
        self._check_slot(slot)
        return self.model.mlp(layer, self.check_component(component))

    def mlp_weights(self, component: str, layer: int, slot: str | None = None):
        mlp = self.mlp(component, layer, slot)
        return MLPWeights.of(mlp) if isinstance(mlp, SwiGLUMLP) else None

    def skipped(self, component: str) -> dict:
        return {s: list(v) for s, v in self.config.skip.get(self.check_component(component), {}).items()}

    def moe_spec(self, component: str):
        return self.config.moe.get(self.check_component(component))

    def _check_slot(self, slot):
        if slot not in (None, "mlp"):
            raise ValueError(f"a MoT layer has one MLP per tower (slot 'mlp'), not {slot!r}")

    def _mlp_prefix(self, component: str, layer: int) -> str:
        return f"{LAYERS_PREFIX}{layer}.mlp{SUFFIX[component]}."

    def rebuild(self, skip=None, mlps=None, moe=None, **options) -> "MoTFamily":
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"the {self.name} family has no option {unknown}; it has {self.options}")
        changes = dict(options)
        if skip is not None:
            merged = {c: {s: list(v) for s, v in subs.items()} for c, subs in self.config.skip.items()}
            for c, subs in skip.items():  # each given list replaces that sublayer's list
                merged.setdefault(self.check_component(c), {}).update({s: sorted(v) for s, v in subs.items()})
            changes["skip"] = merged
        replaced = {}
        if mlps:
            widths = {c: list(v) for c, v in self.config.mlp_widths.items()}
            for (component, layer, slot), block in mlps.items():
                self._check_slot(slot)
                self.check_component(component)
                prefix = self._mlp_prefix(component, layer)
                if isinstance(block, MLPWeights):
                    if block.kind != "swiglu":
                        raise ValueError(
                            f"a MoT's MLPs are SwiGLU; got {block.kind} weights for {component} layer {layer}"
                        )
                    widths.setdefault(
                        component, [self.config.mlp_width(component, i) for i in range(self.config.num_hidden_layers)]
                    )
                    widths[component][layer] = block.width
                    replaced[prefix] = {
                        "gate_proj.weight": block.gate,
                        "up_proj.weight": block.up,
                        "down_proj.weight": block.down,
                    }
                else:
                    replaced[prefix] = block.state_dict()
            if any(isinstance(b, MLPWeights) for b in mlps.values()):
                changes["mlp_widths"] = widths
        if moe:
            changes["moe"] = {**self.config.moe, **moe}

        def transform(state):
            state = {k: v for k, v in state.items() if not k.startswith(tuple(replaced))}
            for prefix, entries in replaced.items():
                state.update({prefix + k: v for k, v in entries.items()})
            return state

        return MoTFamily(_restructure(self.model, _derived_config(self.model, **changes), transform), self.tokenizer)

    def sublayer_output_parameters(self, component: str, sublayer: str, layer: int) -> list:
        self.check_component(component)
        sfx = SUFFIX[component]
        if sublayer == "attn":
            return [self.model.layers[layer].self_attn.get_parameter("o_proj" + sfx + ".weight")]
        mlp = self.mlp(component, layer)
        # the down projections of a dense MLP, of every expert and of a shared expert (and a GELU
        # MoE's output bias): without them the block adds zero
        return [
            p
            for n, p in mlp.named_parameters()
            if n.split(".")[-2:-1] == ["down_proj"] or n.endswith("down_proj") or n == "down_bias"
        ]

    def parameter_component(self, name: str) -> str:
        """``gen`` for the generation tower (``*_moe_gen``), ``und`` for the understanding tower,
        ``shared`` for embeddings, heads, vision encoder, codec projections and time embeddings."""
        if "_moe_gen" in name:
            return "gen"
        if name.startswith(LAYERS_PREFIX) or name.startswith("language_model.model.norm."):
            return "und"
        return "shared"

    def in_layers(self, name: str) -> bool:
        return name.startswith(LAYERS_PREFIX)

    @property
    def image_geometry(self) -> ImageGeometry:
        return ImageGeometry.from_mot_config(self.config)

    # ------------------------------------------------------------------ tasks
    def understanding_logits(self, images, question_ids, observer=None):
        return self.model.understanding_logits(images, question_ids, observer=observer)

    def generate_images(self, prompt_ids, seeds, observer=None, **sampler):
        return self.model.generate_images(prompt_ids, seeds, observer=observer, **sampler)

    @property
    def default_shift(self) -> float:
        return float(self.config.timestep_shift)

    def noise_shape(self, n: int) -> tuple:
        return (n, self.config.num_latent_tokens, self.config.latent_dim)

    def flow_loss(self, prompt_ids, images, cond_keep=None, noise=None, t=None, observer=None):
        return self.model.flow_loss(prompt_ids, images, cond_keep=cond_keep, noise=noise, t=t, observer=observer)

    @property
    def training_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    def latent_moments(self, images):
        return self.model.codec.moments(images.to(device=self.device, dtype=torch.float32))

    def decode_latents(self, tokens):
        return self.model.codec.decode(tokens.to(self.device))

    def velocity_at(self, prompt_ids, x_t, t, cond_keep=None, observer=None):
        return self.model.velocity_at(prompt_ids, x_t, t, cond_keep=cond_keep, observer=observer)

    def codec(self):
        codec = self.model.codec
        return codec if isinstance(codec, torch.nn.Module) else None

    def codec_description(self) -> dict:
        c = self.config
        return {
            **super().codec_description(),
            "codec": c.codec,
            "codec_config": c.codec_config,
            "latent_patch_size": c.latent_patch_size,
        }

    # ------------------------------------------------------------------ files
    def save(self, out_dir, extra_files=()) -> None:
        save_model(self.model, out_dir, extra_files=extra_files)


def _derived_config(model, **changes) -> MoTConfig:
    data = copy.deepcopy(model.config.to_dict())
    for key in ("architectures", "transformers_version", "model_type"):
        data.pop(key, None)
    data.update(changes)
    return MoTConfig(**data)


def _restructure(model, config: MoTConfig, transform=None) -> MoTForUnifiedModel:
    """A new model with ``config``; weights copied from ``model`` (optionally transformed).

    Every parameter of the new model must come from the old state dict: keys the new structure does
    not have are dropped (removed sublayers); a missing key is an error, never a silent re-init.
    """
    state = model.state_dict()
    if transform is not None:
        state = transform(state)
    with torch.device("meta"):
        new = MoTForUnifiedModel(config)
    wanted = new.state_dict().keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise RuntimeError(f"restructure: no weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    new = new.to_empty(device=model.device)
    new.load_state_dict({k: state[k].detach().clone() for k in wanted}, strict=True, assign=True)
    new.eval()
    return new
