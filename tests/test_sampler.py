"""BAGEL's sampler settings: the CFG interval, CFG renormalisation and where their values are defined."""

from pathlib import Path

import pytest
import torch

from helpers.models import make_model
from unisparse.config_checks import config_schema
from unisparse.evaluate import EVAL_DEFAULTS
from unisparse.models.sampling import CFG_RENORM_TYPES, SAMPLER_DEFAULTS, guided_velocity

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 6, 7], [8, 9]]


@pytest.fixture(scope="module")
def model():
    return make_model(prompt_format="bagel")


def test_an_interval_that_holds_no_step_is_unguided(model):
    """Outside the interval only the conditional pass runs: the same images as cfg_scale 1."""
    unguided = model.generate_images(PROMPTS, [1, 2], num_steps=3, cfg_scale=1.0)
    outside = model.generate_images(PROMPTS, [1, 2], num_steps=3, cfg_scale=4.0, cfg_interval=(1.0, 1.0))
    guided = model.generate_images(PROMPTS, [1, 2], num_steps=3, cfg_scale=4.0)
    torch.testing.assert_close(outside, unguided, atol=0, rtol=0)
    assert not torch.allclose(guided, unguided)


def test_interval_guides_exactly_the_steps_inside_it(model):
    """Guiding the first step only (t=1 is inside (0.9, 1]) differs from guiding none and from all."""
    first = model.generate_images(PROMPTS, [1, 2], num_steps=3, cfg_scale=4.0, cfg_interval=(0.99, 1.0))
    none = model.generate_images(PROMPTS, [1, 2], num_steps=3, cfg_scale=1.0)
    every = model.generate_images(PROMPTS, [1, 2], num_steps=3, cfg_scale=4.0)
    assert not torch.allclose(first, none) and not torch.allclose(first, every)


def test_renormalisation_bounds_the_guided_norm():
    g = torch.Generator().manual_seed(0)
    v_c, v_u = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    plain = guided_velocity(v_c, v_u, 4.0)
    torch.testing.assert_close(plain, v_u + 4.0 * (v_c - v_u))
    glob = guided_velocity(v_c, v_u, 4.0, "global")
    assert torch.all(glob.flatten(1).norm(dim=1) <= v_c.flatten(1).norm(dim=1) * (1 + 1e-5))
    chan = guided_velocity(v_c, v_u, 4.0, "channel")
    assert torch.all(chan.norm(dim=-1) <= v_c.norm(dim=-1) * (1 + 1e-5))
    # the scale lies in [renorm_min, 1]: renorm_min 1 switches renormalisation off (BAGEL's clamp);
    # scale 1 is the conditional velocity, left untouched
    torch.testing.assert_close(guided_velocity(v_c, v_u, 4.0, "global", renorm_min=1.0), plain)
    torch.testing.assert_close(guided_velocity(v_c, v_u, 1.0, "channel"), v_c)
    with pytest.raises(ValueError, match="cfg_renorm"):
        guided_velocity(v_c, v_u, 4.0, "layer")


def test_sampler_settings_are_defined_once():
    schema = config_schema(REPO / "workflow/schemas/config.schema.yaml")
    assert schema["$defs"]["cfg_renorm"]["enum"] == list(CFG_RENORM_TYPES)
    for section in ("evaluate", "calibrate"):
        assert set(SAMPLER_DEFAULTS) <= set(schema["properties"][section]["properties"]), section
    assert {k: EVAL_DEFAULTS[k] for k in SAMPLER_DEFAULTS if k not in ("num_steps", "cfg_scale")} == {
        k: v for k, v in SAMPLER_DEFAULTS.items() if k not in ("num_steps", "cfg_scale")
    }


def test_benchmark_names_are_defined_once():
    from unisparse.benchmarks import BENCHMARKS, check_benchmarks

    schema = config_schema(REPO / "workflow/schemas/config.schema.yaml")
    assert {t: p["enum"] for t, p in schema["$defs"]["benchmarks"]["properties"].items()} == {
        t: list(v) for t, v in BENCHMARKS.items()
    }
    assert check_benchmarks({"gen": "shapes_geneval"}) == {"gen": "shapes_geneval", "und": "shapesqa"}
    with pytest.raises(ValueError, match="unknown benchmark 'coco'"):
        check_benchmarks({"gen": "coco"})


def test_schema_knows_every_evaluation_setting():
    """Every evaluation setting the library accepts can be set in the config, and the GenEval prompt
    variants the schema allows are the data files the runner has."""
    from unisparse.evaluate.geneval import METADATA_FILES

    schema = config_schema(REPO / "workflow/schemas/config.schema.yaml")["properties"]["evaluate"]
    assert set(EVAL_DEFAULTS) == set(schema["properties"])
    assert sorted(schema["properties"]["geneval_prompts"]["enum"]) == sorted(METADATA_FILES)
