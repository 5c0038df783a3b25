"""The algorithms' identities, once per model family, through the family adapter only.

Every family must pass the same tests: dropping nothing or keeping every neuron changes nothing; a
dropped sublayer computes what a zeroed one does; all experts active equals the dense MLP (SwiGLU and
GELU) to 1e-5; every artifact reloads with identical outputs. Families whose optional dependency is
missing (Qwen-Image: diffusers) are skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.models import make_model
from unisparse.families import Family, load_family
from unisparse.families.mot import MoTFamily
from unisparse.moe.convert import convert_to_moe
from unisparse.prune import prune_depth, prune_width
from unisparse.tasks import qa_batch
from unisparse.text import ShapesTokenizer
from unisparse.worlds import shapes

FAMILIES = ["mot", "qwen_image"]


def build(name: str, tmp_path) -> Family:
    if name == "mot":
        return MoTFamily(make_model(), ShapesTokenizer())
    pytest.importorskip("diffusers")
    from helpers.qwen_image import write_tiny_pipeline
    from unisparse.families.qwen_image import import_qwen_image

    # a raw diffusers snapshot has no SHA256SUMS: imported, as the pipeline does, it has one
    return load_family(import_qwen_image(write_tiny_pipeline(tmp_path / "raw"), tmp_path / "qwen"))


@pytest.fixture(params=FAMILIES)
def family(request, tmp_path):
    return build(request.param, tmp_path)


@torch.no_grad()
def outputs(family: Family):
    """Understanding logits and a two-step sample (fixed seeds) on a few shapes-world inputs."""
    items = shapes.qa_set("eval", 3, 0)
    images, questions, _ = qa_batch(items, family.encode)
    prompts = [family.encode(p.text) for p, _ in shapes.geneval_set("eval", 1, 1, 0)[:2]]
    return (
        family.understanding_logits(images, questions).float(),
        family.generate_images(prompts, [1, 2], num_steps=2, cfg_scale=2.0).float(),
    )


def assert_same(a, b, atol=0.0):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_rebuilding_with_nothing_changed_changes_nothing(family):
    ref = outputs(family)
    assert_same(outputs(prune_depth(family, None, "gen", "block", 0)), ref)
    for component in family.components:
        assert_same(outputs(prune_width(family, component, 1.0, "weight")), ref)


@pytest.mark.parametrize("sublayer", ["attn", "mlp"])
def test_a_dropped_sublayer_equals_a_zeroed_one(family, sublayer):
    for component in family.components:
        layer = family.num_layers(component) - 1
        dropped = family.rebuild(skip={component: {sublayer: [layer]}})
        zeroed = family.with_model(copy.deepcopy(family.model))
        with torch.no_grad():
            for p in zeroed.sublayer_output_parameters(component, sublayer, layer):
                p.zero_()
        assert dropped.skipped(component)[sublayer] == [layer]
        assert_same(outputs(dropped), outputs(zeroed), atol=1e-6)


def test_all_experts_active_equal_the_dense_mlp(family):
    for component in family.components:
        width = family.mlp_weights(component, 0).width
        experts = 4 if width % 4 == 0 else 2
        moe = convert_to_moe(family, component, experts, experts, method="snake", dense_layers="none")
        kinds = {family.mlp_weights(component, i, s).kind for i, s in family.mlp_places(component)}
        assert moe.moe_spec(component)["num_experts"] == experts and kinds
        assert_same(outputs(moe), outputs(family), atol=1e-5)


def test_every_artifact_reloads_with_identical_outputs(family, tmp_path):
    component = family.components[-1]
    variants = {
        "depth": family.rebuild(skip={component: {"mlp": [0]}}),
        "width": prune_width(family, component, 0.5, "weight"),
        "moe": convert_to_moe(family, component, 2, 1, dense_layers="none"),
    }
    for name, variant in variants.items():
        variant.save(tmp_path / name)
        reloaded = load_family(tmp_path / name)
        assert type(reloaded) is type(variant)
        assert_same(outputs(reloaded), outputs(variant))


def test_understanding_images_are_sized_by_a_typed_geometry(family):
    """Each family says how benchmarks size its images as one ``ImageGeometry``; the evaluators read
    that object only, never a MoT config's field names."""
    from pathlib import Path

    from unisparse.evaluate import mme
    from unisparse.families.base import ImageGeometry

    g = family.image_geometry
    assert isinstance(g, ImageGeometry) and ImageGeometry.of(family) == g
    if family.name == "mot":
        c = family.config
        assert g == ImageGeometry("letterbox", c.vit_image_size, c.vit_patch_size, c.vit_max_num_patch_per_side)
        assert ImageGeometry.of(c) == g  # library callers passing model.config
    else:
        assert g == ImageGeometry("letterbox", 448, 28, 16)  # Qwen2-VL's merged-patch grid
    from PIL import Image

    assert mme.bagel_transform(Image.new("RGB", (60, 30)), g).shape == (g.image_size, g.image_size, 3)
    with pytest.raises(ValueError, match="resize"):
        ImageGeometry("stretch", 28, 14, 2)
    with pytest.raises(ValueError, match="patch_size"):
        ImageGeometry("navit", 28, 0, 2)
    evaluate = Path(mme.__file__).parent
    for path in sorted(evaluate.glob("*.py")):
        text = path.read_text()
        for field in ("vit_image_size", "vit_patch_size", "vit_max_num_patch_per_side", "image_config", ".vision"):
            assert field not in text, f"{path.name} names {field}"
