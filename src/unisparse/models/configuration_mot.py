"""Configuration of the BAGEL-architecture Mixture-of-Transformers (MoT).

Every structural change the pipeline makes (dropped sublayers, per-layer MLP widths, MoE layers) is
recorded here, so that any artifact reloads with ``from_pretrained`` and nothing else.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ..choices import COMPONENTS, SKIPPED_ATTENTION_KV, SUBLAYERS
from ..sizes import GEOMETRY_DEFAULTS, check_model_sizes

#: weight-name suffix of each component's tower, as in BAGEL (``q_proj`` / ``q_proj_moe_gen``)
SUFFIX = {"und": "", "gen": "_moe_gen"}
#: what a dropped understanding attention sublayer still provides to generation tokens
#: the vision tower: a linear patch encoder (the tiny default) or BAGEL's SigLIP NaViT
VISIONS = ("patch", "siglip_navit")
#: the image <-> latent codec: identity patchify (tiny) or the FLUX autoencoder (BAGEL)
CODECS = ("identity", "flux")
#: token layout of both tasks: ``compact`` (the tiny default: ``<bos> prompt <eos> <img> latents``) or
#: ``bagel`` (BAGEL's: ``<bos> prompt <eos>`` then ``<vision_start> latents <vision_end>`` in one block)
PROMPT_FORMATS = ("compact", "bagel")
#: latent position table: trained (tiny) or BAGEL's frozen 2-D sine-cosine table
LATENT_POS_EMBEDS = ("learned", "sincos")


def check_component(name: str) -> str:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; this model has {list(COMPONENTS)}")
    return name


class MoTConfig(PretrainedConfig):
    """Sizes of the MoT, its pluggable parts, plus its pruning / MoE state.

    Parts (the tiny default's values first; ``models.bagel.BAGEL_LAYOUT`` sets BAGEL's):
      * ``vision`` (``VISIONS``) with ``vit_config`` (the SigLIP sizes), ``vit_image_size`` (side of an
        understood image; ``image_size`` is a generated one's) and ``vit_max_num_patch_per_side``;
      * ``codec`` (``CODECS``) with ``codec_config`` (the FLUX autoencoder's sizes);
      * ``prompt_format`` (``PROMPT_FORMATS``), ``timestep_scale`` (t is scaled by it before the sinusoid),
        ``max_latent_size`` and ``latent_pos_embed`` (``LATENT_POS_EMBEDS``).

    Pruning state:
      * ``skip``: ``{component: {"attn": [layer, ...], "mlp": [layer, ...]}}`` sublayers not computed
        for that component's tokens (and whose weights are not stored).
      * ``skipped_attention_kv``: ``"keep"`` (default) — a dropped understanding attention sublayer
        still projects the prompt's keys/values so generation tokens keep seeing the text;
        ``"none"`` — as published for BAGEL: at that layer the prompt provides no keys/values.
      * ``mlp_widths``: ``{component: [width per layer]}`` after width reduction (None = uniform).
      * ``moe``: ``{component: {"layers": [...], "num_experts": E, "top_k": k, "expert_size": I_e,
        "shared_size": S, "router": "paper"|"softmax"}}`` for MLPs split into experts.
    """

    model_type = "unisparse_mot"

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 64,
        intermediate_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        image_size: int = 16,
        vit_image_size: int | None = None,
        num_channels: int = 3,
        vit_patch_size: int = GEOMETRY_DEFAULTS["vit_patch_size"],
        vit_hidden_size: int = 64,
        vision: str = "patch",
        vit_config: dict | None = None,
        vit_max_num_patch_per_side: int | None = None,
        codec: str = "identity",
        codec_config: dict | None = None,
        latent_patch_size: int = GEOMETRY_DEFAULTS["latent_patch_size"],
        latent_channels: int = 3,
        latent_downsample: int = GEOMETRY_DEFAULTS["latent_downsample"],
        time_embed_dim: int = 64,
        timestep_scale: float = 1000.0,
        max_latent_size: int | None = None,
        latent_pos_embed: str = "learned",
        prompt_format: str = "compact",
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        image_start_token_id: int = 3,
        image_end_token_id: int = 4,
        timestep_shift: float = 3.0,
        skip: dict | None = None,
        skipped_attention_kv: str = "keep",
        mlp_widths: dict | None = None,
        moe: dict | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.image_size = image_size
        self.num_channels = num_channels
        self.vit_patch_size = vit_patch_size
        self.vit_hidden_size = vit_hidden_size
        self.vit_image_size = vit_image_size or image_size
        self.vision = vision
        self.vit_config = dict(vit_config or {})
        self.vit_max_num_patch_per_side = vit_max_num_patch_per_side or self.vit_image_size // vit_patch_size
        self.codec = codec
        self.codec_config = dict(codec_config or {})
        self.latent_patch_size = latent_patch_size
        self.latent_channels = latent_channels
        self.latent_downsample = latent_downsample
        self.time_embed_dim = time_embed_dim
        self.timestep_scale = timestep_scale
        self.max_latent_size = max_latent_size or image_size // (latent_downsample * latent_patch_size)
        self.latent_pos_embed = latent_pos_embed
        self.prompt_format = prompt_format
        self.image_start_token_id = image_start_token_id
        self.image_end_token_id = image_end_token_id
        self.timestep_shift = timestep_shift
        self.skip = _normalise_skip(skip)
        self.skipped_attention_kv = skipped_attention_kv
        self.mlp_widths = mlp_widths or {}
        self.moe = moe or {}
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.validate_structure()

    # ------------------------------------------------------------------ derived sizes
    @property
    def latent_grid(self) -> int:
        return self.image_size // (self.latent_downsample * self.latent_patch_size)

    @property
    def num_latent_tokens(self) -> int:
        return self.latent_grid**2

    @property
    def latent_dim(self) -> int:
        return self.latent_channels * self.latent_patch_size**2

    @property
    def vit_grid(self) -> int:
        """Patches per side of an understanding image (``vit_image_size``; BAGEL: 980 / 14 = 70)."""
        return self.vit_image_size // self.vit_patch_size

    @property
    def num_vit_tokens(self) -> int:
        return self.vit_grid**2

    # ------------------------------------------------------------------ structure queries
    def is_skipped(self, component: str, sublayer: str, layer: int) -> bool:
        return layer in self.skip.get(component, {}).get(sublayer, [])

    def mlp_width(self, component: str, layer: int) -> int:
        widths = self.mlp_widths.get(component)
        return int(widths[layer]) if widths else self.intermediate_size

    def moe_spec(self, component: str, layer: int) -> dict | None:
        spec = self.moe.get(component)
        if spec and layer in spec["layers"]:
            return spec
        return None

    def validate_structure(self) -> None:
        """Fail early on inconsistent sizes instead of at the first matmul."""
        check_model_sizes(
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.image_size,
            self.vit_patch_size,
            self.latent_patch_size,
            self.latent_downsample,
            self.vit_image_size,
        )
        for name, allowed in (
            ("skipped_attention_kv", SKIPPED_ATTENTION_KV),
            ("vision", VISIONS),
            ("codec", CODECS),
            ("prompt_format", PROMPT_FORMATS),
            ("latent_pos_embed", LATENT_POS_EMBEDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.max_latent_size < self.latent_grid:
            raise ValueError(
                f"max_latent_size={self.max_latent_size} is smaller than the latent grid {self.latent_grid} "
                f"of {self.image_size}-pixel images"
            )
        if self.vit_max_num_patch_per_side < self.vit_grid:
            raise ValueError(
                f"vit_max_num_patch_per_side={self.vit_max_num_patch_per_side} is smaller than the ViT grid "
                f"{self.vit_grid} of {self.vit_image_size}-pixel images"
            )
        for comp, widths in self.mlp_widths.items():
            check_component(comp)
            if len(widths) != self.num_hidden_layers or min(widths) < 1:
                raise ValueError(f"mlp_widths[{comp!r}] needs {self.num_hidden_layers} positive widths")
        for comp, spec in self.moe.items():
            check_component(comp)
            if spec["top_k"] > spec["num_experts"] or spec["top_k"] < 1:
                raise ValueError(f"moe[{comp!r}]: top_k must be in [1, num_experts]")


def _normalise_skip(skip: dict | None) -> dict:
    out: dict = {}
    for comp, subs in (skip or {}).items():
        check_component(comp)
        out[comp] = {}
        for sub, layers in subs.items():
            if sub not in SUBLAYERS:
                raise ValueError(f"unknown sublayer {sub!r}; expected one of {SUBLAYERS}")
            out[comp][sub] = sorted(int(i) for i in layers)
    return out
