"""The Qwen-Image family on a tiny random pipeline: import and loading, both tasks, and every structure
change (dropped sublayers, widths, MoE) computing what it should and surviving save / load."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from helpers.qwen_image import write_tiny_pipeline  # noqa: E402
from unisparse.families.qwen_image import QwenImageFamily, import_qwen_image  # noqa: E402
from unisparse.io import IntegrityError  # noqa: E402
from unisparse.models.blocks import MLPWeights  # noqa: E402

#: the tiny vision tower (patch 4, merge 2) reads a 16x16 image as is (the default bounds upsample it)
SETTINGS = {"und_min_pixels": 64}
SAMPLER = dict(num_steps=2, cfg_scale=3.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine spinning threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_image")
    raw = write_tiny_pipeline(root / "snapshot")
    model_dir = import_qwen_image(raw, root / "model", settings=SETTINGS)
    return {"root": root, "raw": raw, "model": model_dir}


@pytest.fixture(scope="module")
def family(dirs):
    return QwenImageFamily.load(dirs["model"])


@pytest.fixture(scope="module")
def inputs(family):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 16, 16, 3, generator=g)
    return {
        "images": images,
        "questions": [family.encode("what colour is the square"), family.encode("how many circles are there")],
        "prompts": [family.encode("a red square"), family.encode("two circles left of a blue ring")],
        "noise": torch.randn(family.noise_shape(2), generator=g),
        "t": torch.tensor([0.3, 0.8]),
    }


def outputs(family, inputs, sample: bool = True) -> dict:
    """What the tasks compute (sampling only where a test needs it: it is the slow part)."""
    out = {"und": family.understanding_logits(inputs["images"], inputs["questions"])}
    with torch.no_grad():
        out["loss"] = family.flow_loss(inputs["prompts"], inputs["images"], noise=inputs["noise"], t=inputs["t"])
    if sample:
        out["images"] = family.generate_images(inputs["prompts"], [0, 1], **SAMPLER)
    return out


def assert_same(a: dict, b: dict, atol: float = 0.0):
    for key in a:
        if atol:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(family, inputs):
    return outputs(family, inputs)


# --------------------------------------------------------------------------- files


def test_directory_layout_and_strict_loading(dirs, family, tmp_path):
    model_dir = dirs["model"]
    for name in ("model_index.json", "SHA256SUMS", "text_encoder", "transformer", "vae", "tokenizer", "scheduler"):
        assert (model_dir / name).exists(), name
    assert not list(model_dir.rglob("*.bin")) and not list(model_dir.rglob("*.pt"))
    assert QwenImageFamily.is_model_dir(model_dir) and QwenImageFamily.is_model_dir(dirs["raw"])
    assert not QwenImageFamily.is_model_dir(tmp_path)
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_unisparse"]["family"] == "qwen_image"
    assert index["_unisparse"]["settings"]["und_min_pixels"] == 64
    from unisparse.families import family_name_of

    assert family_name_of(model_dir) == "qwen_image"

    # a flipped byte is caught by the manifest, a missing tensor by the strict load
    import shutil

    from safetensors.torch import load_file, save_file

    from unisparse.io import write_manifest

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="diffusion_pytorch_model"):
        QwenImageFamily.load(broken)
    state = load_file(weights)
    state.pop("transformer_blocks.1.img_mlp.net.2.bias")
    save_file(state, weights)
    write_manifest(broken)
    with pytest.raises(IntegrityError, match="img_mlp"):
        QwenImageFamily.load(broken)


def test_structure_queries(family):
    assert family.num_layers("und") == 2 and family.num_layers("gen") == 2
    assert family.mlp_slots("und") == ("mlp",) and family.mlp_slots("gen") == ("img_mlp", "txt_mlp")
    w = family.mlp_weights("und", 0)
    assert w.kind == "swiglu" and w.width == 32 and w.hidden_size == 16
    g = family.mlp_weights("gen", 1, "txt_mlp")
    assert g.kind == "gelu" and g.width == 192 and g.up_bias is not None and g.down_bias is not None
    assert family.skipped("gen") == {"attn": [], "mlp": []} and family.moe_spec("und") is None
    names = dict(family.model.named_parameters())
    components = {family.parameter_component(n) for n in names}
    assert components == {"und", "gen", "shared"}
    assert all(family.parameter_component(n) == "shared" for n in names if n.startswith("vae."))
    assert family.in_layers("transformer.transformer_blocks.0.attn.to_q.weight")
    assert family.in_layers("text_encoder.model.language_model.layers.1.mlp.up_proj.weight")
    assert not family.in_layers("text_encoder.model.visual.blocks.0.mlp.up_proj.weight")
    assert family.describe()["gen"]["mlp_width"] == 192
    assert family.tokenizer.decode(family.encode("a red square")) == "a red square"


# --------------------------------------------------------------------------- tasks


def test_understanding_matches_transformers_forward(family, inputs, reference):
    """Our input construction (patches, grid, image pads, M-RoPE positions) is what transformers'
    own forward computes from the same ids."""
    te = family.text_encoder
    pixel_values, grid, n = family._pixel_inputs(inputs["images"])
    assert n == 4 and grid.tolist() == [[1, 4, 4]] * 2
    pre, mid, post = family._template_ids(family.settings["und_template"], "{image}", "{question}")
    ids, mask = family._pad([pre + [te.config.image_token_id] * n + mid + q + post for q in inputs["questions"]])
    with torch.no_grad():
        logits = te(
            input_ids=ids,
            attention_mask=mask.long(),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == te.config.image_token_id).int(),
        ).logits
    last = logits[torch.arange(2), mask.sum(1) - 1]
    torch.testing.assert_close(reference["und"], last.float(), atol=1e-5, rtol=1e-5)
    assert reference["und"].shape == (2, len(family.tokenizer.hf))
    assert torch.equal(family.understanding_logits(inputs["images"], inputs["questions"]), reference["und"])


def test_generation_is_deterministic(family, inputs, reference):
    images = reference["images"]
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
    again = family.generate_images(inputs["prompts"], [0, 1], **SAMPLER)
    assert torch.equal(images, again)
    alone = family.generate_images(inputs["prompts"][1:], [1], **SAMPLER)  # the batch does not matter
    torch.testing.assert_close(alone[0], images[1], atol=1e-5, rtol=0)
    other = family.generate_images(inputs["prompts"], [0, 2], **SAMPLER)
    assert torch.equal(other[0], images[0]) and not torch.equal(other[1], images[1])
    renormed = family.generate_images(
        inputs["prompts"], [0, 1], num_steps=2, cfg_scale=3.0, cfg_renorm="pipeline", cfg_interval=[0.5, 1.0], shift=3.0
    )
    assert renormed.shape == images.shape


def test_sampling_matches_qwen_image_pipeline(dirs, family, inputs):
    """Prompt encoding, noise, sigmas (dynamic shift, terminal stretch), true CFG with the pipeline's
    renormalisation, Euler steps and decoding are QwenImagePipeline's (the empty negative prompt)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(dirs["raw"])
    pipe.set_progress_bar_config(disable=True)
    pre, _ = family._template_ids(family.settings["gen_template"], "{}")
    pipe.prompt_template_encode_start_idx = len(pre)  # upstream hard-codes the real tokenizer's 34
    texts = [family.tokenizer.decode(p) for p in inputs["prompts"]]
    expected = pipe(
        texts,
        negative_prompt=["", ""],
        true_cfg_scale=3.0,
        height=16,
        width=16,
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="pt",
    ).images
    got = family.generate_images(inputs["prompts"], [0, 1], num_steps=3, cfg_scale=3.0, cfg_renorm="pipeline")
    torch.testing.assert_close(got, expected.permute(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_save_load_round_trip(family, inputs, reference, tmp_path):
    family.save(tmp_path / "copy")
    assert_same(reference, outputs(QwenImageFamily.load(tmp_path / "copy"), inputs))


def test_rebuild_without_changes_is_identical(family, inputs, reference):
    assert_same(reference, outputs(family.rebuild(), inputs))


def test_flow_loss_trains_only_the_mmdit(family, inputs):
    model = family.rebuild()
    for name, p in model.model.named_parameters():
        p.requires_grad_(model.parameter_component(name) == "gen")
    loss = model.flow_loss(inputs["prompts"], inputs["images"], cond_keep=torch.tensor([True, False]))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    grads = {n: p.grad for n, p in model.model.named_parameters()}
    assert all(g is None for n, g in grads.items() if not n.startswith("transformer."))
    assert grads["transformer.transformer_blocks.0.img_mlp.net.0.proj.weight"].abs().sum() > 0


class Recorder:
    def __init__(self):
        self.calls = []

    def on_layer(self, layer, component, h_in, attn_update, mlp_update, mlp_aux):
        self.calls.append((component, layer, (mlp_aux or {}).get("slot"), h_in, attn_update, mlp_update, mlp_aux))


def test_observer_sees_every_layer(family, inputs):
    rec = Recorder()
    logits = family.understanding_logits(inputs["images"], inputs["questions"], observer=rec)
    assert torch.equal(logits, family.understanding_logits(inputs["images"], inputs["questions"]))
    assert [(c, i) for c, i, *_ in rec.calls] == [("und", 0), ("und", 1)]
    n_tokens = rec.calls[0][3].shape[0]  # rows: the valid tokens of both samples
    pre, mid, post = family._template_ids(family.settings["und_template"], "{image}", "{question}")
    assert n_tokens == sum(len(pre) + 4 + len(mid) + len(q) + len(post) for q in inputs["questions"])
    for _, _, _, h, a, m, aux in rec.calls:
        assert h.shape == a.shape == m.shape == (n_tokens, 16) and aux["act"].shape == (n_tokens, 32)

    rec = Recorder()
    family.generate_images(inputs["prompts"], [0, 1], observer=rec, **SAMPLER)
    gen = [c for c in rec.calls if c[0] == "gen"]
    assert len(gen) == SAMPLER["num_steps"] * 2 * 2  # steps x layers x streams
    assert {(i, s) for _, i, s, *_ in gen} == {(i, s) for i in range(2) for s in ("img_mlp", "txt_mlp")}
    _, cond_mask = family.encode_prompts(inputs["prompts"])
    _, uncond_mask = family.encode_prompts([[], []])
    rows = {
        "img_mlp": 2 * 2 * 4,  # (cond + uncond) x batch x 2x2 latent tokens
        "txt_mlp": int(cond_mask.sum() + uncond_mask.sum()),
    }  # valid text tokens only
    for _, _, slot, h, a, m, aux in gen:
        assert h.shape == a.shape == m.shape == (rows[slot], 48) and aux["act"].shape == (rows[slot], 192)
    und = [c for c in rec.calls if c[0] == "und"]
    assert len(und) == 2 * 2  # the prompt and the empty prompt each pass through both text layers


# --------------------------------------------------------------------------- structure changes


def zeroed(family, component: str, sublayers, layer: int):
    model = family.rebuild()
    with torch.no_grad():
        for sub in sublayers:
            for p in model.sublayer_output_parameters(component, sub, layer):
                p.zero_()
    return model


@pytest.mark.parametrize("component", ["und", "gen"])
@pytest.mark.parametrize("sublayers", [("attn",), ("mlp",), ("attn", "mlp")], ids=["attn", "mlp", "block"])
def test_dropping_a_sublayer_equals_zeroing_it(family, inputs, component, sublayers, tmp_path):
    layer = 1 if component == "und" else 0
    dropped = family.rebuild(skip={component: {s: [layer] for s in sublayers}})
    assert dropped.skipped(component) == {s: [layer] if s in sublayers else [] for s in ("attn", "mlp")}
    if "mlp" in sublayers:
        assert all(dropped.mlp(component, layer, s) is None for s in dropped.mlp_slots(component))
    assert sum(p.numel() for p in dropped.model.parameters()) < sum(p.numel() for p in family.model.parameters())
    expected = outputs(zeroed(family, component, sublayers, layer), inputs, sample=False)
    got = outputs(dropped, inputs, sample=False)
    assert_same(expected, got, atol=1e-6)
    changed = "und" if component == "und" else "loss"  # the sublayer mattered: this is no trivial pass
    assert (got[changed] - outputs(family, inputs, sample=False)[changed]).abs().max() > 1e-3
    if sublayers == ("attn", "mlp"):
        dropped.save(tmp_path / "dropped")
        assert_same(got, outputs(QwenImageFamily.load(tmp_path / "dropped"), inputs, sample=False))


def test_dropping_more_keeps_earlier_drops_and_never_restores(family, inputs):
    once = family.rebuild(skip={"gen": {"attn": [1]}})
    twice = once.rebuild(skip={"gen": {"attn": [1], "mlp": [1]}})
    assert twice.skipped("gen") == {"attn": [1], "mlp": [1]}
    assert_same(
        outputs(family.rebuild(skip={"gen": {"attn": [1], "mlp": [1]}}), inputs, sample=False),
        outputs(twice, inputs, sample=False),
    )
    with pytest.raises(ValueError, match="cannot come back"):
        once.rebuild(skip={"gen": {"attn": []}})


def all_mlps(family, select):
    return {(c, i, s): select(family.mlp_weights(c, i, s)) for c in family.components for i, s in family.mlp_places(c)}


def test_width_pruning(family, inputs, reference, tmp_path):
    kept_all = family.rebuild(mlps=all_mlps(family, lambda w: w.select(torch.arange(w.width))))
    assert_same(reference, outputs(kept_all, inputs))

    g = torch.Generator().manual_seed(3)
    narrow = family.rebuild(
        mlps=all_mlps(family, lambda w: w.select(torch.randperm(w.width, generator=g)[: w.width // 2]))
    )
    assert narrow.mlp_weights("und", 1).width == 16 and narrow.mlp_weights("gen", 0, "img_mlp").width == 96
    assert narrow.transformer.config.mlp_widths == {"img_mlp": [96, 96], "txt_mlp": [96, 96]}
    got = outputs(narrow, inputs, sample=False)
    assert not torch.equal(got["loss"], reference["loss"])
    narrow.save(tmp_path / "narrow")
    assert_same(got, outputs(QwenImageFamily.load(tmp_path / "narrow"), inputs, sample=False))


@pytest.mark.parametrize("component", ["und", "gen"])
def test_moe_with_every_expert_active_is_the_dense_mlp(family, inputs, reference, component, tmp_path):
    from unisparse.models.moe_block import MoEMLP, make_moe_spec

    E = 4
    kind = "swiglu" if component == "und" else "gelu"
    layers = [0, 1]
    blocks, spec = {}, None
    for i, slot in family.mlp_places(component):
        w: MLPWeights = family.mlp_weights(component, i, slot)
        spec = make_moe_spec(
            layers, num_experts=E, top_k=E, expert_size=w.width // E, router="paper", dispatch="loop", activation=kind
        )
        blocks[(component, i, slot)] = MoEMLP.from_dense(w, [], torch.arange(w.width).view(E, -1), spec)
    moe = family.rebuild(mlps=blocks, moe={component: spec})
    assert moe.moe_spec(component)["layers"] == layers and moe.mlp_weights(component, 0) is None
    got = outputs(moe, inputs, sample=False)
    assert_same({k: reference[k] for k in got}, got, atol=1e-5)
    rec = Recorder()
    moe.understanding_logits(inputs["images"], inputs["questions"], observer=rec)
    moe.flow_loss(inputs["prompts"], inputs["images"], noise=inputs["noise"], t=inputs["t"], observer=rec)
    aux = [c[-1] for c in rec.calls if c[0] == component]
    assert aux and all("router_logits" in a and a["expert_idx"].shape[-1] == E for a in aux)
    rows = [c[3].shape[0] for c in rec.calls if c[0] == component]
    assert all(a["router_logits"].shape[0] == n for a, n in zip(aux, rows))
    moe.save(tmp_path / "moe")
    reloaded = QwenImageFamily.load(tmp_path / "moe")
    assert reloaded.moe_spec(component) == moe.moe_spec(component)
    assert_same(got, outputs(reloaded, inputs, sample=False))
