"""A BAGEL-architecture Mixture-of-Transformers as a transformers ``PreTrainedModel``.

One Qwen2-style decoder whose layers hold two towers of identical shape: the understanding tower
(``q_proj``, ``mlp``, ...) for text and ViT tokens and the generation tower (``q_proj_moe_gen``,
``mlp_moe_gen``, ...) for noised latent tokens. Routing is hard, by token type; attention is one
joint softmax over all tokens. Module names follow BAGEL so real weights map 1:1.

Token types: ``UND`` (0), ``GEN`` (1) and ``PAD`` (-1, computed by no tower).
Sublayers listed in ``config.skip`` are not built and not computed for that tower's tokens.
An optional ``observer`` (``families.base.LayerObserver``) receives each layer's per-tower tensors
(calibration statistics, router logits) without any state being stored on modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .blocks import SwiGLUMLP
from .configuration_mot import COMPONENTS, SUFFIX, MoTConfig
from .moe_block import MoEMLP
from .patches import patchify, unpatchify
from .sampling import MOT_RENORMS, check_renorm, guided_velocity

UND, GEN, PAD = 0, 1, -1
TOKEN_TYPE = {"und": UND, "gen": GEN}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def build_mlp(config: MoTConfig, layer: int, component: str) -> nn.Module:
    spec = config.moe_spec(component, layer)
    if spec is not None:
        return MoEMLP(config.hidden_size, spec)
    return SwiGLUMLP(config.hidden_size, config.mlp_width(component, layer))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype=torch.float32):
    """cos/sin tables [B, 1, T, d], computed in fp32 on the positions' device, returned in ``dtype``."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


class MoTAttention(nn.Module):
    """Per-tower q/k/v/o projections and q/k RMSNorm; one joint attention over all tokens."""

    def __init__(self, config: MoTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        for comp in COMPONENTS:
            sfx = SUFFIX[comp]
            skipped = config.is_skipped(comp, "attn", layer)
            needs_kv = not skipped or (comp == "und" and config.skipped_attention_kv == "keep")
            if not skipped:
                setattr(self, "q_proj" + sfx, nn.Linear(h, self.num_heads * d, bias=True))
                setattr(self, "o_proj" + sfx, nn.Linear(self.num_heads * d, h, bias=False))
                setattr(self, "q_norm" + sfx, RMSNorm(d, config.rms_norm_eps))
            if needs_kv:
                setattr(self, "k_proj" + sfx, nn.Linear(h, self.num_kv_heads * d, bias=True))
                setattr(self, "v_proj" + sfx, nn.Linear(h, self.num_kv_heads * d, bias=True))
                setattr(self, "k_norm" + sfx, RMSNorm(d, config.rms_norm_eps))

    def has(self, name: str, comp: str) -> bool:
        return hasattr(self, name + SUFFIX[comp])

    def proj(self, name: str, comp: str, x):
        return getattr(self, name + SUFFIX[comp])(x)


class MoTDecoderLayer(nn.Module):
    def __init__(self, config: MoTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.config = config
        self.self_attn = MoTAttention(config, layer)
        for comp in COMPONENTS:
            sfx = SUFFIX[comp]
            if self.self_attn.has("k_proj", comp):
                setattr(self, "input_layernorm" + sfx, RMSNorm(config.hidden_size, config.rms_norm_eps))
            if not config.is_skipped(comp, "mlp", layer):
                setattr(self, "post_attention_layernorm" + sfx, RMSNorm(config.hidden_size, config.rms_norm_eps))
                setattr(self, "mlp" + sfx, build_mlp(config, layer, comp))

    def forward(self, h, rows, cos, sin, base_mask, past=None, observer=None, need_aux=False):
        """One MoT layer on padded tokens.

        h: [B, T, H]; rows: {comp: flat indices of that tower's tokens}; cos/sin: rope for the current
        tokens; base_mask: [B, T, Tpast + T] allowed attention before key availability; past:
        (k, v, valid) of earlier tokens at this layer. Returns (h, (k, v, valid) of current tokens).
        """
        B, T, H = h.shape
        attn = self.self_attn
        nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        flat = h.reshape(B * T, H)
        h_in = {c: flat[r] for c, r in rows.items()}
        q = flat.new_zeros(B * T, nh, d)
        k = flat.new_zeros(B * T, nkv, d)
        v = flat.new_zeros(B * T, nkv, d)
        kv_valid = torch.zeros(B * T, dtype=torch.bool, device=h.device)
        any_query = False
        for comp, r in rows.items():
            if r.numel() == 0 or not attn.has("k_proj", comp):
                continue
            x = getattr(self, "input_layernorm" + SUFFIX[comp])(h_in[comp])
            k[r] = attn.proj("k_norm", comp, attn.proj("k_proj", comp, x).view(-1, nkv, d))
            v[r] = attn.proj("v_proj", comp, x).view(-1, nkv, d)
            kv_valid[r] = True
            if attn.has("q_proj", comp):
                q[r] = attn.proj("q_norm", comp, attn.proj("q_proj", comp, x).view(-1, nh, d))
                any_query = True
        q = q.view(B, T, nh, d).transpose(1, 2)
        k = k.view(B, T, nkv, d).transpose(1, 2)
        v = v.view(B, T, nkv, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        kv_valid = kv_valid.view(B, T)
        present = (k, v, kv_valid)

        attn_update = {}
        if any_query:
            if past is not None:
                k_all = torch.cat([past[0], k], dim=2)
                v_all = torch.cat([past[1], v], dim=2)
                valid_all = torch.cat([past[2], kv_valid], dim=1)
            else:
                k_all, v_all, valid_all = k, v, kv_valid
            mask = base_mask & valid_all[:, None, :]
            # rows with nothing to attend to are never used; let them see themselves to avoid NaN
            Tp = k_all.shape[2] - T
            eye = torch.zeros_like(mask)
            diag = torch.arange(T, device=mask.device)
            eye[:, diag, Tp + diag] = True
            mask = mask | (eye & ~mask.any(-1, keepdim=True))
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None], enable_gqa=True)
            out = out.transpose(1, 2).reshape(B * T, nh * d)
            for comp, r in rows.items():
                if r.numel() and attn.has("q_proj", comp):
                    attn_update[comp] = attn.proj("o_proj", comp, out[r])

        new_flat = flat.clone()
        for comp, r in rows.items():
            if r.numel() == 0:
                continue
            x = h_in[comp] + attn_update[comp] if comp in attn_update else h_in[comp]
            mlp_update, aux = None, None
            mlp = getattr(self, "mlp" + SUFFIX[comp], None)
            if mlp is not None:
                y = getattr(self, "post_attention_layernorm" + SUFFIX[comp])(x)
                if observer is not None or need_aux:
                    mlp_update, aux = mlp(y, return_aux=True)
                else:
                    mlp_update = mlp(y)
                x = x + mlp_update
            new_flat[r] = x
            if observer is not None:
                observer.on_layer(self.layer, comp, h_in[comp], attn_update.get(comp), mlp_update, aux)
        return new_flat.view(B, T, H), present


class TimestepEmbedder(nn.Module):
    """Sinusoid of ``scale * t`` (cos half, then sin half) followed by Linear-SiLU-Linear, as in DiT.
    BAGEL feeds t in [0, 1] unscaled (``timestep_scale`` 1); the tiny default scales it by 1000."""

    def __init__(self, hidden_size: int, freq_dim: int, scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.float() * self.scale)[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class PatchEncoder(nn.Module):
    """Stand-in for SigLIP: a linear patch embedding with learned positions and one GELU."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        patch_dim = config.num_channels * config.vit_patch_size**2
        self.patch_embedding = nn.Linear(patch_dim, config.vit_hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(config.num_vit_tokens, config.vit_hidden_size))
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, patches):
        return F.gelu(self.patch_embedding(patches) + self.position_embedding)


class MLPConnector(nn.Module):
    """ViT features -> LLM width: ``fc2(gelu_tanh(fc1(x)))`` (BAGEL's ``connector``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PositionEmbedding(nn.Module):
    """A table of ``max_side**2`` positions indexed ``row * max_side + col`` (BAGEL's ``vit_pos_embed`` and
    ``latent_pos_embed``). ``learned``: trained (the tiny default's latent positions); ``sincos``: the
    frozen 2-D sine-cosine table BAGEL stores in its checkpoint."""

    def __init__(self, max_side: int, dim: int, learned: bool = False):
        super().__init__()
        self.max_side = max_side
        self.learned = learned
        self.pos_embed = nn.Parameter(torch.zeros(max_side * max_side, dim), requires_grad=learned)
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            if self.learned:
                nn.init.normal_(self.pos_embed, std=0.02)
            else:
                self.pos_embed.copy_(sincos_2d(self.max_side, self.pos_embed.shape[1], self.pos_embed.device))

    def grid_ids(self, grid: int, device=None):
        """Position ids of a square ``grid`` x ``grid`` image, row-major."""
        r = torch.arange(grid, device=device)
        return (r[:, None] * self.max_side + r[None, :]).reshape(-1)

    def forward(self, position_ids):
        return self.pos_embed[position_ids]


class MoTLanguageModel(nn.Module):
    """Qwen2 decoder with both towers: ``model.layers``, ``model.norm``, ``model.norm_moe_gen``."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LanguageModelWrapper(nn.Module):
    def __init__(self, config: MoTConfig):
        super().__init__()
        self.model = MoTLanguageModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


def sincos_2d(grid: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine table [grid*grid, dim] in BAGEL's (DiT's) layout: the first half encodes the
    column, the second the row, each as [sin, cos] over ``dim / 4`` frequencies."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / max(quarter, 1)))
    pos = torch.arange(grid, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def enc(p):
        out = p.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([enc(cols), enc(rows)], dim=1).float()
    return F.pad(emb, (0, dim - emb.shape[1]))


class IdentityCodec:
    """Stand-in for the FLUX autoencoder: the latent is the image itself, scaled to [-1, 1]."""

    def __init__(self, config: MoTConfig):
        self.config = config

    def encode(self, images):
        return patchify(images * 2.0 - 1.0, self.config.latent_patch_size)

    def moments(self, images):
        """The latent's mean and standard deviation (zero: the identity codec is deterministic)."""
        mean = self.encode(images)
        return mean, torch.zeros_like(mean)

    def decode(self, tokens):
        c = self.config
        img = unpatchify(tokens, c.latent_patch_size, c.latent_grid, c.latent_channels)
        return ((img + 1.0) / 2.0).clamp(0.0, 1.0)


def build_vision_tower(config: MoTConfig) -> nn.Module:
    """``vit_model``: the tiny patch encoder or BAGEL's SigLIP NaViT (a pluggable part, same interface:
    ``vision_features(model, images)`` below)."""
    if config.vision == "siglip_navit":
        from .siglip_navit import SiglipNaViT

        return SiglipNaViT({**config.vit_config, "max_num_patch_per_side": config.vit_max_num_patch_per_side})
    return PatchEncoder(config)


def build_codec(config: MoTConfig):
    """The image <-> latent-token codec; the FLUX autoencoder is a module (its weights are the model's
    ``vae_model.*``), the identity codec holds no weights."""
    if config.codec == "flux":
        from .flux_autoencoder import FluxCodec

        return FluxCodec(config)
    return IdentityCodec(config)


class MoTForUnifiedModel(PreTrainedModel):
    """The unified model: understanding (image + question -> answer token) and generation
    (prompt -> image by rectified flow) through one MoT decoder."""

    config_class = MoTConfig
    base_model_prefix = "language_model"
    _no_split_modules = ["MoTDecoderLayer"]

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        h = config.hidden_size
        self.language_model = LanguageModelWrapper(config)
        self.vit_model = build_vision_tower(config)
        self.connector = MLPConnector(config.vit_hidden_size, h)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, h)
        self.vae2llm = nn.Linear(config.latent_dim, h)
        self.llm2vae = nn.Linear(h, config.latent_dim)
        self.time_embedder = TimestepEmbedder(h, config.time_embed_dim, config.timestep_scale)
        self.latent_pos_embed = PositionEmbedding(
            config.max_latent_size, h, learned=config.latent_pos_embed == "learned"
        )
        codec = build_codec(config)
        if isinstance(codec, nn.Module):
            self.vae_model = codec  # weights under vae_model.* (BAGEL keeps them in ae.safetensors)
        else:
            self._codec = codec
        self.post_init()

    @property
    def codec(self):
        return self.vae_model if isinstance(getattr(self, "vae_model", None), nn.Module) else self._codec

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, PositionEmbedding):
            module.reset_parameters()
        elif isinstance(module, PatchEncoder):
            nn.init.normal_(module.position_embedding, std=0.02)

    # ------------------------------------------------------------------ structure
    @property
    def layers(self):
        return self.language_model.model.layers

    def component_names(self) -> tuple[str, ...]:
        return COMPONENTS

    def mlp(self, layer: int, component: str):
        return getattr(self.layers[layer], "mlp" + SUFFIX[component], None)

    # ------------------------------------------------------------------ core pass
    def run_layers(self, h, token_types, position_ids, base_mask, past=None, observer=None, need_aux=False):
        """Run all layers. Returns final hidden states and the per-layer (k, v, valid) of these tokens."""
        B, T, _ = h.shape
        flat_types = token_types.reshape(-1)
        rows = {c: torch.nonzero(flat_types == TOKEN_TYPE[c]).squeeze(1) for c in COMPONENTS}
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            h, present = layer(h, rows, cos, sin, base_mask, None if past is None else past[i], observer, need_aux)
            presents.append(present)
        return h, presents

    @staticmethod
    def causal_mask(q_pos, k_pos, k_valid):
        """Token i sees token j iff pos_j <= pos_i (image tokens share one position: full within an image)."""
        return (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]

    # ------------------------------------------------------------------ understanding
    def vision_tokens(self, images) -> list:
        """Images -> one [n_i, hidden] tensor per image: vision tower, connector, ``vit_pos_embed``.

        ``images``: [B, H, W, C] in [0, 1], or (``siglip_navit``) a list of [H_i, W_i, C] images of any
        sides that are multiples of the patch (NaViT: each keeps its aspect ratio; position ids are
        ``row * max_side + col``, so a small image uses the top-left of the table)."""
        c = self.config
        device = self.device
        if c.vision != "siglip_navit":  # the tiny patch encoder has fixed positions: one size
            images = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
            images = images.to(device=device, dtype=self.dtype)
            ids = self.vit_pos_embed.grid_ids(c.vit_grid, device)
            feats = self.vit_model(patchify(images, c.vit_patch_size))
            return list(self.connector(feats) + self.vit_pos_embed(ids).to(feats.dtype))
        p, side = c.vit_patch_size, c.vit_max_num_patch_per_side
        patches, ids, sizes = [], [], []
        for img in images:
            img = img.to(device=device, dtype=self.dtype)
            H, W = img.shape[0], img.shape[1]
            if H % p or W % p or H // p > side or W // p > side:
                raise ValueError(f"a {H}x{W} image needs sides that are multiples of {p} and at most {p * side}")
            patches.append(patchify(img[None] * 2.0 - 1.0, p)[0])  # SigLIP sees [-1, 1] (mean = std = 0.5)
            r, col = torch.arange(H // p, device=device), torch.arange(W // p, device=device)
            ids.append((r[:, None] * side + col[None, :]).reshape(-1))
            sizes.append(ids[-1].numel())
        ids = torch.cat(ids)
        feats = self.vit_model(torch.cat(patches), ids, sizes)
        tokens = self.connector(feats) + self.vit_pos_embed(ids).to(feats.dtype)
        return list(tokens.split(sizes))

    def understanding_inputs(self, images, question_ids: list[list[int]]):
        """The understanding sequence, right-padded; returns the embeddings, types, positions, validity
        and the index of each sample's last real token (whose logits answer).

        ``compact``: ``<bos> <img> [vit] </img> question``; ``bagel``: ``<vision_start> [vit] <vision_end>``
        at one position, then ``<bos> question <eos> <bos>`` (the answer starts after a new ``<bos>``).
        ``images``: a batch [B, H, W, C] or a list of images of their own sizes (``vision_tokens``)."""
        c = self.config
        device = self.device
        img_toks = self.vision_tokens(images)
        if len(img_toks) != len(question_ids):
            raise ValueError(f"{len(img_toks)} images for {len(question_ids)} questions")
        bagel = c.prompt_format == "bagel"
        off = 1 if bagel else 2  # index of the first ViT token
        seqs, positions = [], []
        for q, tok in zip(question_ids, img_toks):
            img = [c.image_start_token_id] + [c.pad_token_id] * tok.shape[0] + [c.image_end_token_id]
            if bagel:
                text = [c.bos_token_id] + list(q) + [c.eos_token_id, c.bos_token_id]
                seqs.append(img + text)
                positions.append([0] * len(img) + list(range(1, 1 + len(text))))
            else:
                seqs.append([c.bos_token_id] + img + list(q))
                positions.append([0, 1] + [2] * tok.shape[0] + list(range(3, 3 + 1 + len(q))))
        B, T = len(seqs), max(len(s) for s in seqs)
        # token layout is built on the host (Python lists), then moved once
        ids = torch.full((B, T), c.pad_token_id, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        pos = torch.zeros(B, T, dtype=torch.long)
        last = torch.zeros(B, dtype=torch.long)
        slots_b, slots_t = [], []  # where each image token goes
        for b, (toks, p, tok) in enumerate(zip(seqs, positions, img_toks)):
            ids[b, : len(toks)] = torch.tensor(toks)
            valid[b, : len(toks)] = True
            pos[b, : len(p)] = torch.tensor(p)
            last[b] = len(toks) - 1
            slots_b += [b] * tok.shape[0]
            slots_t += range(off, off + tok.shape[0])
        ids, valid, pos, last = (x.to(device) for x in (ids, valid, pos, last))
        h = self.language_model.model.embed_tokens(ids)
        slots = (torch.tensor(slots_b).to(device), torch.tensor(slots_t).to(device))
        h = h.index_put(slots, torch.cat(img_toks).to(h.dtype))
        types = torch.where(valid, UND, PAD)
        return h, types, pos, valid, last

    def understanding_logits(self, images, question_ids, observer=None):
        """Next-token logits after the question (the one-token answer), [B, vocab]."""
        h, types, pos, valid, last = self.understanding_inputs(images, question_ids)
        mask = self.causal_mask(pos, pos, valid)
        h, _ = self.run_layers(h, types, pos, mask, observer=observer)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]
        return self.language_model.lm_head(self.language_model.model.norm(h_last)).float()

    # ------------------------------------------------------------------ generation
    def prompt_inputs(self, prompt_ids: list[list[int]]):
        """``<bos> prompt <eos>`` right-padded (understanding tower); ``compact`` appends ``<img>``."""
        c = self.config
        tail = [c.eos_token_id] + ([] if c.prompt_format == "bagel" else [c.image_start_token_id])
        seqs = [[c.bos_token_id] + list(p) + tail for p in prompt_ids]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), c.pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(seqs), T, dtype=torch.bool)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            valid[b, : len(s)] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        pos = torch.arange(T, device=self.device).expand(len(seqs), T) * valid
        return ids, valid, pos, valid.sum(1)

    @property
    def latent_offset(self) -> int:
        """Tokens before the latents in the image block (``bagel``: the ``<vision_start>`` marker)."""
        return 1 if self.config.prompt_format == "bagel" else 0

    def latent_block(self, x_t, t):
        """The image block of a generation forward: embeddings [B, Lb, H] and token types [B, Lb].
        A latent token is ``vae2llm(x_t) + time_embedding(t) + latent_pos_embed`` (generation tower);
        ``bagel`` wraps the latents in ``<vision_start>`` / ``<vision_end>`` (understanding tower)."""
        c = self.config
        B = x_t.shape[0]
        ids = self.latent_pos_embed.grid_ids(c.latent_grid, self.device)
        h = self.vae2llm(x_t.to(self.dtype)) + self.time_embedder(t)[:, None] + self.latent_pos_embed(ids)[None]
        types = torch.full(h.shape[:2], GEN, device=self.device)
        if c.prompt_format == "bagel":
            markers = torch.tensor([c.image_start_token_id, c.image_end_token_id], device=self.device)
            m = self.language_model.model.embed_tokens(markers).expand(B, 2, -1).to(h.dtype)
            h = torch.cat([m[:, :1], h, m[:, 1:]], dim=1)
            und = torch.full((B, 1), UND, device=self.device)
            types = torch.cat([und, types, und], dim=1)
        return h, types

    def velocity(self, h_block):
        """The predicted velocity of the block's latent tokens, in fp32 (the sampler integrates and the
        loss compares in fp32)."""
        off = self.latent_offset
        h_latents = h_block[:, off : off + self.config.num_latent_tokens]
        return self.llm2vae(self.language_model.model.norm_moe_gen(h_latents)).float()

    def flow_loss(
        self, prompt_ids, images, cond_keep=None, generator=None, observer=None, need_aux=False, noise=None, t=None
    ):
        """Rectified-flow loss (fp32): ``x_t = (1-t) x0 + t noise``, target ``v = noise - x0``, t = sigmoid(N(0,1)).

        cond_keep: bool [B]; False drops the prompt for that sample (classifier-free guidance training).
        noise / t: given by a caller that draws a larger batch and trains on a slice of it (several
        processes); otherwise drawn from ``generator`` (noise first, then t).
        """
        x0 = self.codec.encode(images.to(device=self.device, dtype=torch.float32))
        if noise is None:  # drawn where the generator lives (the CPU): identical on every device
            noise = torch.randn(x0.shape, generator=generator, device=_device_of(generator))
        if t is None:
            t = torch.sigmoid(torch.randn(len(x0), generator=generator, device=_device_of(generator)))
        noise, t = noise.to(self.device, torch.float32), t.to(self.device, torch.float32)
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
        v = self.velocity_at(prompt_ids, x_t, t, cond_keep=cond_keep, observer=observer, need_aux=need_aux)
        return F.mse_loss(v, noise - x0)

    def velocity_at(self, prompt_ids, x_t, t, cond_keep=None, observer=None, need_aux=False):
        """The predicted velocity (fp32 [B, L, D]) of noised latent tokens ``x_t`` at times ``t`` [B]
        after each prompt, in one training-style forward (prompt and latents together); ``cond_keep``
        False hides the prompt from that sample's latents (classifier-free guidance training)."""
        ids, pvalid, ppos, plen = self.prompt_inputs(prompt_ids)
        B, Tp = ids.shape
        block, block_types = self.latent_block(x_t.to(self.device, torch.float32), t.to(self.device, torch.float32))
        h = torch.cat([self.language_model.model.embed_tokens(ids), block], dim=1)
        Lb = block.shape[1]
        pos = torch.cat([ppos, plen[:, None].expand(B, Lb)], dim=1)
        if cond_keep is None:
            cond_keep = torch.ones(B, dtype=torch.bool, device=self.device)
        cond_keep = cond_keep.to(self.device)
        valid = torch.cat([pvalid, torch.ones(B, Lb, dtype=torch.bool, device=self.device)], dim=1)
        mask = self.causal_mask(pos, pos, valid)
        mask[:, Tp:, :Tp] &= cond_keep[:, None, None]
        types = torch.cat([torch.where(pvalid, UND, PAD), block_types], dim=1)
        h, _ = self.run_layers(h, types, pos, mask, observer=observer, need_aux=need_aux)
        return self.velocity(h[:, Tp:])

    def prefill(self, prompt_ids, observer=None):
        """Run the prompt through the understanding tower once; return the per-layer KV cache."""
        ids, valid, pos, plen = self.prompt_inputs(prompt_ids)
        h = self.language_model.model.embed_tokens(ids)
        types = torch.where(valid, UND, PAD)
        _, presents = self.run_layers(h, types, pos, self.causal_mask(pos, pos, valid), observer=observer)
        return presents, pos, plen

    @staticmethod
    def shifted_timesteps(num_steps: int, shift: float):
        t = torch.linspace(1.0, 0.0, num_steps + 1)
        return shift * t / (1 + (shift - 1) * t)

    @torch.no_grad()
    def generate_images(
        self,
        prompt_ids,
        seeds,
        num_steps=20,
        cfg_scale=4.0,
        shift=None,
        observer=None,
        cfg_interval=(0.0, 1.0),
        cfg_renorm="none",
        cfg_renorm_min=0.0,
    ):
        """Euler sampling from t=1 (noise) to t=0 on the shifted schedule (``num_steps`` steps; BAGEL's
        ``num_timesteps`` is ``num_steps + 1``), with classifier-free guidance where
        ``cfg_interval[0] < t <= cfg_interval[1]`` (the unconditional pass sees no prompt) and optional
        CFG renormalisation (``CFG_RENORM_TYPES``). Each sample's noise comes from its own seed, so an
        image does not depend on what else is in the batch. Returns [B, H, W, C] in [0, 1]."""
        check_renorm(cfg_renorm, MOT_RENORMS)
        c = self.config
        shift = c.timestep_shift if shift is None else shift
        B, L = len(prompt_ids), c.num_latent_tokens
        # per-sample noise drawn on the CPU from the sample's seed: the same image on every device
        noise = torch.stack(
            [torch.randn(L, c.latent_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        x = noise.to(self.device)  # the Euler state stays fp32; latent_block casts to the model dtype
        presents, ppos, plen = self.prefill(prompt_ids, observer=observer)
        Tp = ppos.shape[1]
        Lb = L + 2 * self.latent_offset

        def setting(reps: int):
            """past KV, positions and mask for ``reps`` copies of the batch (2: + unconditional rows)."""
            past = []
            for k, v, valid in presents:
                if reps == 2:  # unconditional rows keep the keys but see none of them
                    past.append((torch.cat([k, k]), torch.cat([v, v]), torch.cat([valid, torch.zeros_like(valid)])))
                else:
                    past.append((k, v, valid))
            lpos = plen.repeat(reps)[:, None].expand(B * reps, Lb)
            k_pos = torch.cat([ppos.repeat(reps, 1), lpos], dim=1)
            k_valid = torch.ones(B * reps, Tp + Lb, dtype=torch.bool, device=self.device)
            return past, lpos, self.causal_mask(lpos, k_pos, k_valid)

        settings = {1: setting(1)}
        if cfg_scale != 1.0:
            settings[2] = setting(2)
        ts = self.shifted_timesteps(num_steps, shift)
        for i in range(num_steps):
            t, t_next = float(ts[i]), float(ts[i + 1])
            reps = 2 if cfg_scale != 1.0 and cfg_interval[0] < t <= cfg_interval[1] else 1
            past, lpos, mask = settings[reps]
            h, types = self.latent_block(x.repeat(reps, 1, 1), torch.full((B * reps,), t, device=self.device))
            h, _ = self.run_layers(h, types, lpos, mask, past=past, observer=observer)
            v = self.velocity(h)
            if reps == 2:
                v = guided_velocity(v[:B], v[B:], cfg_scale, cfg_renorm, cfg_renorm_min)
            x = x - (t - t_next) * v
        return self.codec.decode(x)


def _device_of(generator):
    return generator.device if generator is not None else torch.device("cpu")


# the config's model type resolves to this class through transformers' Auto classes (models.loading)
AutoConfig.register(MoTConfig.model_type, MoTConfig, exist_ok=True)
AutoModel.register(MoTConfig, MoTForUnifiedModel, exist_ok=True)
