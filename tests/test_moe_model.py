"""Model-level MoE conversion and tuning (the block itself is tested in test_moe_block.py)."""

import pytest
import torch

from helpers.models import make_model
from unisparse.accounting import parameter_counts
from unisparse.calibrate import Calibration, run_calibration
from unisparse.families import family_for
from unisparse.io import save_model
from unisparse.models.loading import load_model
from unisparse.moe.convert import convert_to_moe
from unisparse.moe.tune import trainable_names, tune_moe
from unisparse.worlds import shapes

CAL = dict(qa_items=8, samples_per_prompt=1, max_prompts_per_tag=1, num_steps=2, coactivation=True, threads=1)
TUNE = dict(steps=6, batch_gen=4, checkpoint_every=2, threads=1, lr=1e-2)


def gen_outputs(model):
    prompts = [shapes.encode(p.text) for p, _ in shapes.geneval_set("eval", 1, 1, 0)[:3]]
    return model.generate_images(prompts, [1, 2, 3], num_steps=2)


@pytest.fixture(scope="module")
def dense_and_cal():
    model = make_model()
    return model, Calibration.from_stats(run_calibration(model, "gen", CAL), "gen")


@pytest.mark.parametrize("method", ["snake", "contiguous", "random", "cluster"])
def test_all_experts_active_equals_dense_model(dense_and_cal, method):
    dense, cal = dense_and_cal
    moe = convert_to_moe(dense, "gen", 8, 8, method=method, calibration=cal, dense_layers="none")
    torch.testing.assert_close(gen_outputs(moe), gen_outputs(dense), atol=1e-5, rtol=1e-5)


def test_half_active_halves_active_mlp_parameters_and_reloads(tmp_path, dense_and_cal):
    dense, cal = dense_and_cal
    moe = convert_to_moe(dense, "gen", 8, 4, calibration=cal, dense_layers="first_last")
    assert moe.config.moe["gen"]["layers"] == [1]
    counts = parameter_counts(moe)
    mlp = 3 * dense.config.hidden_size * dense.config.intermediate_size
    assert counts["total"]["gen"] - counts["active"]["gen"] == mlp // 2
    save_model(moe, tmp_path / "moe")
    assert torch.equal(gen_outputs(load_model(tmp_path / "moe")), gen_outputs(moe))


def test_expert_frozen_tuning_changes_routers_only(dense_and_cal):
    dense, cal = dense_and_cal
    moe = convert_to_moe(dense, "gen", 8, 4, calibration=cal, dense_layers="none")
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    tune_moe(moe, "gen", "frozen", TUNE, progress=False)
    changed = {k for k, v in moe.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "routers did not move"
    assert changed <= set(trainable_names(family_for(moe), "gen", "frozen"))
    assert all(k.endswith("mlp_moe_gen.gate.weight") for k in changed)


def test_full_tuning_leaves_understanding_tower_alone(dense_and_cal):
    dense, cal = dense_and_cal
    moe = convert_to_moe(dense, "gen", 8, 4, calibration=cal, dense_layers="none")
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    tune_moe(moe, "gen", "full", TUNE, progress=False)
    changed = {k for k, v in moe.state_dict().items() if not torch.equal(v, before[k])}
    assert any("experts" in k for k in changed)
    assert all("mlp_moe_gen." in k for k in changed)


def test_killed_run_resumes_to_identical_weights(tmp_path, dense_and_cal):
    dense, cal = dense_and_cal
    base = convert_to_moe(dense, "gen", 8, 4, calibration=cal, dense_layers="none")
    save_model(base, tmp_path / "base")
    straight = load_model(tmp_path / "base")
    tune_moe(straight, "gen", "full", TUNE, progress=False)
    interrupted = load_model(tmp_path / "base")
    tune_moe(interrupted, "gen", "full", TUNE, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=3)
    resumed = load_model(tmp_path / "base")  # a fresh process would start from the saved input again
    tune_moe(resumed, "gen", "full", TUNE, checkpoint_dir=tmp_path / "ck", progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_tuning_of_a_dense_component_changes_only_its_mlps(dense_and_cal):
    """The tuned controls: `full` on a component without experts trains exactly its MLPs."""
    import copy

    dense, _ = dense_and_cal
    model = copy.deepcopy(dense)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = set(trainable_names(family_for(model), "gen", "full"))
    assert names and all(".mlp_moe_gen." in n for n in names)
    assert len(names) == 3 * model.config.num_hidden_layers
    tune_moe(model, "gen", "full", TUNE, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= names


def test_bad_moe_requests_fail_before_work(dense_and_cal):
    dense, cal = dense_and_cal
    with pytest.raises(ValueError, match="does not divide"):
        convert_to_moe(dense, "gen", 5, 2, calibration=cal)
    with pytest.raises(ValueError, match="top_k"):
        convert_to_moe(dense, "gen", 8, 9, calibration=cal)
    with pytest.raises(ValueError, match="component"):
        convert_to_moe(dense, "vision", 8, 4, calibration=cal)
    with pytest.raises(ValueError, match="no routers to tune"):
        tune_moe(dense, "gen", "frozen", TUNE, progress=False)


def test_tuning_data_is_a_parameter(dense_and_cal):
    """``tune_moe`` draws its batches from ``examples`` (the shapes world by default): the same
    draws give the same weights, other data other weights."""
    import copy

    import numpy as np

    from unisparse.moe.tune import shapes_examples

    dense, cal = dense_and_cal
    moe = convert_to_moe(dense, "gen", 4, 2, calibration=cal, dense_layers="none")
    calls = []

    def recorded(rng, n):
        calls.append(n)
        return shapes_examples(rng, n)

    other_rng = np.random.default_rng(123)

    def other(rng, n):  # the same world, other draws
        return shapes_examples(other_rng, n)

    tuned = {}
    for name, data in (("default", shapes_examples), ("recorded", recorded), ("other", other)):
        m = copy.deepcopy(moe)
        tune_moe(m, "gen", "full", TUNE, progress=False, examples=data)
        tuned[name] = m.state_dict()
    assert calls == [TUNE["batch_gen"]] * TUNE["steps"]
    assert all(torch.equal(v, tuned["recorded"][k]) for k, v in tuned["default"].items())
    assert not all(torch.equal(v, tuned["other"][k]) for k, v in tuned["default"].items())


def test_internals_take_a_family(dense_and_cal):
    from unisparse.prune.depth import apply_drop

    dense, _ = dense_and_cal
    with pytest.raises(TypeError, match="trainable_names takes a families.Family.*family_for"):
        trainable_names(dense, "gen", "full")
    with pytest.raises(TypeError, match="apply_drop takes a families.Family"):
        apply_drop(dense, "und", {"mlp": [0]})
