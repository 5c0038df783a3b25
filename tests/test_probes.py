import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unisparse import tasks
from unisparse.accounting import parameter_counts
from unisparse.calibrate import Calibration, run_calibration, save_stats
from unisparse.families import family_for
from unisparse.importance import neuron_scores
from unisparse.io import save_model
from unisparse.models.loading import load_model
from unisparse.prune import drop_scores, prune_depth, prune_width
from unisparse.worlds import shapes

CAL = dict(qa_items=12, samples_per_prompt=1, max_prompts_per_tag=1, num_steps=2, batch_size=5, threads=1)


def qa_inputs(n=8):
    return tasks.qa_batch(shapes.qa_set("eval", n, 0))


def prompts(n=3):
    return [shapes.encode(p.text) for p, _ in shapes.geneval_set("eval", 1, 1, 0)[:n]]


def outputs(model):
    images, questions, _ = qa_inputs()
    return model.understanding_logits(images, questions), model.generate_images(prompts(), [1, 2, 3], num_steps=2)


class RecordAll:
    def __init__(self):
        self.rows = {}

    def on_layer(self, layer, comp, h_in, attn, mlp, aux):
        self.rows.setdefault((layer, comp), []).append((h_in, attn, mlp, aux["act"]))


@pytest.mark.parametrize("task", ["und", "gen"])
@torch.no_grad()
def test_streaming_statistics_equal_full_batch(tiny_model, task):
    streamed = Calibration.from_stats(run_calibration(tiny_model, task, CAL), task)
    rec = RecordAll()
    if task == "und":
        images, questions, _ = tasks.qa_batch(shapes.qa_set("calib", CAL["qa_items"], 2))
        tiny_model.understanding_logits(images, questions, observer=rec)
    else:
        pairs = shapes.geneval_set("calib", 1, 1, 3)
        tiny_model.generate_images(
            [shapes.encode(p.text) for p, _ in pairs], [s for _, s in pairs], num_steps=2, cfg_scale=3.0, observer=rec
        )
    for (layer, comp), chunks in rec.rows.items():
        h_in = torch.cat([c[0] for c in chunks]).float()
        attn = torch.cat([c[1] for c in chunks]).float()
        mlp = torch.cat([c[2] for c in chunks]).float()
        act = torch.cat([c[3] for c in chunks]).float()
        mid, out = h_in + attn, h_in + attn + mlp
        expect = {
            "block_ld": F.cosine_similarity(h_in, out, dim=-1).mean(),
            "attn": F.cosine_similarity(h_in, mid, dim=-1).mean(),
            "mlp_ld": F.cosine_similarity(mid, out, dim=-1).mean(),
            "block_bagel": F.cosine_similarity(h_in, mlp, dim=-1).mean(),
            "mlp_bagel": F.cosine_similarity(mid, mlp, dim=-1).mean(),
        }
        for name, value in expect.items():
            assert abs(float(streamed.cosine(comp, name)[layer]) - value.item()) < 1e-5, (layer, comp, name)
        torch.testing.assert_close(streamed.act_abs_mean(comp, layer), act.abs().mean(0), atol=1e-5, rtol=1e-5)


def test_calibration_file_round_trip(tmp_path, tiny_model):
    stats = run_calibration(tiny_model, "und", CAL)
    save_stats(stats, "und", tmp_path / "und.safetensors")
    loaded = Calibration.load(tmp_path / "und.safetensors")
    assert torch.equal(loaded.cosine("und", "block_ld"), Calibration.from_stats(stats, "und").cosine("und", "block_ld"))
    with pytest.raises(ValueError, match="not exercised"):
        drop_scores(loaded, "gen", "block")


def test_drop_zero_and_keep_all_leave_outputs_unchanged(tiny_model):
    cal = Calibration.from_stats(run_calibration(tiny_model, "gen", CAL), "gen")
    ref = outputs(tiny_model)
    for out in (
        outputs(prune_depth(tiny_model, cal, "gen", "block", 0)),
        outputs(prune_width(tiny_model, "und", 1.0, "act_norm", cal)),
    ):
        for a, b in zip(ref, out):
            assert torch.equal(a, b)


def _zeroed(model, comp, sub, layer):
    import copy

    m = copy.deepcopy(model)
    sfx = "" if comp == "und" else "_moe_gen"
    with torch.no_grad():
        if sub == "mlp":
            getattr(m.layers[layer], "mlp" + sfx).down_proj.weight.zero_()
        else:
            getattr(m.layers[layer].self_attn, "o_proj" + sfx).weight.zero_()
    return m


@pytest.mark.parametrize("comp", ["und", "gen"])
@pytest.mark.parametrize("sub", ["attn", "mlp"])
def test_dropping_equals_zero_sublayer(tiny_model, comp, sub):
    from unisparse.prune.depth import apply_drop

    pruned = apply_drop(family_for(tiny_model), comp, {sub: [1]}).model
    for a, b in zip(outputs(pruned), outputs(_zeroed(tiny_model, comp, sub, 1))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sublayer_granularity_ranks_attention_and_mlp_together(tiny_model):
    """`sublayer` drops the n sublayers with the highest cosine among all 2L, attention and MLP alike,
    and equals dropping the same sublayers one type at a time."""
    from unisparse.prune.depth import apply_drop, choose_sublayers

    cal = Calibration.from_stats(run_calibration(tiny_model, "gen", CAL), "gen")
    cos = {
        (sub, i): float(cal.cosine("gen", name)[i])
        for sub, name in (("attn", "attn"), ("mlp", "mlp_ld"))
        for i in range(tiny_model.config.num_hidden_layers)
    }
    L = tiny_model.config.num_hidden_layers
    for n in range(1, 2 * L + 1):
        chosen = choose_sublayers(cal, "gen", "sublayer", n)
        picked = {(sub, i) for sub, layers in chosen.items() for i in layers}
        assert len(picked) == n
        assert min(cos[p] for p in picked) >= max([cos[p] for p in cos if p not in picked], default=-2)
    chosen = choose_sublayers(cal, "gen", "sublayer", 3)
    pruned = prune_depth(tiny_model, cal, "gen", "sublayer", 3)
    assert {s: sorted(v) for s, v in pruned.config.skip["gen"].items() if v} == {s: v for s, v in chosen.items() if v}
    for a, b in zip(outputs(pruned), outputs(apply_drop(family_for(tiny_model), "gen", chosen).model)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one scale"):
        choose_sublayers(cal, "gen", "sublayer", 1, score="bagel")
    with pytest.raises(ValueError, match="only 8 remain|only"):
        choose_sublayers(cal, "gen", "sublayer", 2 * L + 1)


def test_published_kv_policy_hides_prompt_from_generation(tiny_model):
    from unisparse.prune.depth import apply_drop

    keep = apply_drop(family_for(tiny_model), "und", {"attn": [1]}, "keep").model
    none = apply_drop(family_for(tiny_model), "und", {"attn": [1]}, "none").model
    (u1, g1), (u2, g2) = outputs(keep), outputs(none)
    assert torch.equal(u1, u2)  # understanding has no generation tokens
    assert not torch.allclose(g1, g2)
    assert "language_model.model.layers.1.self_attn.k_proj.weight" in keep.state_dict()
    assert "language_model.model.layers.1.self_attn.k_proj.weight" not in none.state_dict()


def test_dropped_sublayer_costs_no_compute(tiny_model):
    from unisparse.prune.depth import apply_drop

    images, questions, _ = qa_inputs(4)

    def flops(m):
        with FlopCounterMode(display=False) as counter:
            m.understanding_logits(images, questions)
        return counter.get_total_flops()

    dense, pruned = flops(tiny_model), flops(apply_drop(family_for(tiny_model), "und", {"mlp": [0]}).model)
    n_tokens = sum(3 + tiny_model.config.num_vit_tokens + len(q) for q in questions)
    c = tiny_model.config
    assert dense - pruned == 2 * n_tokens * 3 * c.hidden_size * c.intermediate_size


def test_width_score_ranks_dead_neuron_last(tiny_model):
    with torch.no_grad():
        mlp = tiny_model.mlp(0, "und")
        mlp.gate_proj.weight[5].zero_()
        mlp.up_proj.weight[5].zero_()
    cal = Calibration.from_stats(run_calibration(tiny_model, "und", CAL), "und")
    scores = neuron_scores(family_for(tiny_model), "und", 0, "act_norm", cal)
    assert int(scores.argmin()) == 5 and float(scores[5]) == 0.0
    pruned = prune_width(tiny_model, "und", 0.5, "act_norm", cal)
    assert pruned.mlp(0, "und").gate_proj.weight.shape[0] == 32
    # neuron 5 is gone: the kept rows never include its (zero) row
    assert not (pruned.mlp(0, "und").gate_proj.weight.abs().sum(1) == 0).any()


def test_pruned_models_reload_identically_with_fewer_parameters(tmp_path, tiny_model):
    cal = Calibration.from_stats(run_calibration(tiny_model, "gen", CAL), "gen")
    for name, m in {
        "depth": prune_depth(tiny_model, cal, "gen", "block", 2),
        "width": prune_width(tiny_model, "gen", 0.25, "act_norm", cal),
    }.items():
        save_model(m, tmp_path / name)
        loaded = load_model(tmp_path / name)
        for a, b in zip(outputs(m), outputs(loaded)):
            assert torch.equal(a, b)
        assert parameter_counts(loaded)["total"]["gen"] < parameter_counts(tiny_model)["total"]["gen"]
        assert parameter_counts(loaded)["total"]["und"] == parameter_counts(tiny_model)["total"]["und"]


def test_iterative_depth_recalibrates(tiny_model):
    calls = []

    def recal(m):
        calls.append(1)
        return Calibration.from_stats(run_calibration(m, "und", CAL), "und")

    cal = recal(tiny_model)
    m = prune_depth(tiny_model, cal, "und", "mlp", 2, iterative=True, recalibrate=recal)
    assert len(m.config.skip["und"]["mlp"]) == 2 and len(calls) == 2


def test_bad_requests_fail_clearly(tiny_model):
    cal = Calibration.from_stats(run_calibration(tiny_model, "und", CAL), "und")
    with pytest.raises(ValueError, match="component"):
        prune_width(tiny_model, "vision", 0.5, "weight")
    with pytest.raises(ValueError, match="keep_ratio"):
        prune_width(tiny_model, "und", 1.5, "weight")
    with pytest.raises(ValueError, match="cannot drop"):
        prune_depth(tiny_model, cal, "und", "block", 4)
