"""A tiny random Qwen-Image pipeline directory in the real snapshot's layout (what ``Qwen/Qwen-Image``
holds: model_index.json, text_encoder/, transformer/, vae/, tokenizer/, scheduler/), built locally:
no download. Sizes follow diffusers' own pipeline tests, shrunk where CPU time matters (the VAE).
"""

from __future__ import annotations

import torch

from unisparse.worlds import shapes

#: Qwen2.5-VL's special tokens (the real tokenizer's names)
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Qwen-Image's scheduler settings (dynamic exponential shift with a terminal sigma)
SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)
TEMPLATE_TEXT = (
    "system Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background: user assistant You are a helpful assistant."
)


def build_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer (like Qwen's) trained on the shapes world's texts and the chat
    templates, with Qwen's special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p.text for p in shapes.all_gen_prompts()] + shapes.all_questions() + shapes.all_answers()
    corpus += [TEMPLATE_TEXT] * 20  # weighted so the template's words become single tokens
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIALS[1:]),
    )


def build_components(tokenizer, num_layers: int = 2):
    """The five pipeline components, tiny and random (seeded)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=len(tokenizer),
            bos_token_id=None,
            initializer_range=0.2,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=16,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
            initializer_range=0.2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    with torch.no_grad():  # diffusers zero-inits nothing here, but make the output layer clearly non-trivial
        transformer.proj_out.weight.normal_(0, 0.2)
    torch.manual_seed(2)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.1, 0.0, 0.2],
        latents_std=[1.5, 0.8, 1.0, 1.2],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return dict(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def perturb_vectors(module, seed: int, scale: float = 0.1):
    """Random norms and biases (not the identity / zero init), so tests exercise every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def write_tiny_pipeline(path, num_layers: int = 2):
    """Save a tiny random ``QwenImagePipeline`` to ``path`` (safetensors) and return ``path``."""
    from diffusers import QwenImagePipeline

    components = build_components(build_tokenizer(), num_layers=num_layers)
    for seed, name in enumerate(("text_encoder", "transformer")):
        perturb_vectors(components[name], seed)
    pipe = QwenImagePipeline(**components)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
