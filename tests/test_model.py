import pytest
import torch

from helpers.models import make_model
from unisparse import tasks
from unisparse.io import save_model
from unisparse.models.configuration_mot import COMPONENTS, SUFFIX
from unisparse.models.loading import load_model
from unisparse.worlds import shapes


def _qa_inputs(n=6):
    return tasks.qa_batch(shapes.qa_set("eval", n, 0))


def _prompts(n=4):
    return [shapes.encode(p.text) for p, _ in shapes.geneval_set("eval", 1, 1, 0)[:n]]


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_model):
    images, questions, _ = _qa_inputs()
    before = tiny_model.understanding_logits(images, questions)
    gen_before = tiny_model.generate_images(_prompts(), [1, 2, 3, 4], num_steps=3)
    save_model(tiny_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.understanding_logits(images, questions), before)
    assert torch.equal(loaded.generate_images(_prompts(), [1, 2, 3, 4], num_steps=3), gen_before)
    assert not list(tmp_path.glob(".m.tmp-*")), "temporary directory left behind"


def test_weight_names_follow_bagel(tiny_model):
    names = set(tiny_model.state_dict())
    for suffix in SUFFIX.values():
        for w in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp", "input_layernorm"):
            assert any(n.startswith(f"language_model.model.layers.0.{w}{suffix}.") for n in names), (w, suffix)
    assert "language_model.model.norm_moe_gen.weight" in names
    assert "language_model.lm_head.weight" in names


def test_towers_are_routed_by_token_type(tiny_model):
    """Understanding never touches generation weights; generation latents never touch und MLPs."""
    images, questions, _ = _qa_inputs()
    base = tiny_model.understanding_logits(images, questions)
    with torch.no_grad():
        for n, p in tiny_model.named_parameters():
            if "_moe_gen" in n:
                p.add_(1.0)
    assert torch.equal(tiny_model.understanding_logits(images, questions), base)


@pytest.mark.parametrize("prompt_format", ["compact", "bagel"])
def test_cached_sampling_equals_full_sequence_forward(prompt_format):
    """The KV-cached prompt + image-block pass equals one forward over prompt and block together (in
    both token layouts; BAGEL's block carries <vision_start>/<vision_end> through the understanding tower)."""
    model = make_model(prompt_format=prompt_format)
    prompts = _prompts(3)
    x = torch.randn(3, model.config.num_latent_tokens, model.config.latent_dim)
    t = torch.full((3,), 0.7)
    presents, ppos, plen = model.prefill(prompts)
    block, types = model.latent_block(x, t)
    Lb = block.shape[1]
    assert Lb == model.config.num_latent_tokens + (2 if prompt_format == "bagel" else 0)
    lpos = plen[:, None].expand(3, Lb)
    Tp = ppos.shape[1]
    mask = model.causal_mask(lpos, torch.cat([ppos, lpos], 1), torch.ones(3, Tp + Lb, dtype=torch.bool))
    h, _ = model.run_layers(block, types, lpos, mask, past=presents)
    v_cached = model.velocity(h)
    # full sequence
    ids, pvalid, ppos2, plen2 = model.prompt_inputs(prompts)
    hfull = torch.cat([model.language_model.model.embed_tokens(ids), block], 1)
    pos = torch.cat([ppos2, lpos], 1)
    valid = torch.cat([pvalid, torch.ones(3, Lb, dtype=torch.bool)], 1)
    all_types = torch.cat([torch.where(pvalid, 0, -1), types], 1)
    hf, _ = model.run_layers(hfull, all_types, pos, model.causal_mask(pos, pos, valid))
    torch.testing.assert_close(model.velocity(hf[:, Tp:]), v_cached, atol=1e-5, rtol=1e-5)


def test_generation_is_batch_independent(tiny_model):
    prompts = _prompts(4)
    together = tiny_model.generate_images(prompts, [5, 6, 7, 8], num_steps=3)
    alone = tiny_model.generate_images(prompts[2:3], [7], num_steps=3)
    torch.testing.assert_close(together[2:3], alone, atol=1e-5, rtol=1e-5)


def test_components_are_enumerable(tiny_model):
    assert tiny_model.component_names() == COMPONENTS
    for layer in range(tiny_model.config.num_hidden_layers):
        for comp in COMPONENTS:
            assert tiny_model.mlp(layer, comp) is not None
