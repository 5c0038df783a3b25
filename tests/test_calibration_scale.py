"""Calibration at BAGEL's scale (issue 11, part 4): the co-activation statistic is an [I, d] sketch
C Omega instead of the full [I, I] matrix C, clustering on it matches clustering on C, its memory is
flat in tokens and far below I*I*8 bytes per layer, and every sidecar says how it was made."""

import hashlib
import json
from math import comb
from pathlib import Path

import pytest
import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from helpers.cli import cli
from helpers.models import make_model
from unisparse.calibrate import (
    CALIB_DEFAULTS,
    LEGACY_COACT_KEY,
    SKETCH_KEY,
    Calibration,
    CalibrationStats,
    run_calibration,
    sketch_projection,
)
from unisparse.config_checks import ConfigError, check_config, config_schema
from unisparse.families import family_for
from unisparse.io import ALLOW_UNVERIFIED_ENV, MANIFEST, save_model, sha256_file, state_digest
from unisparse.models.loading import load_model
from unisparse.moe.partition import partition_neurons
from unisparse.worlds import shapes

REPO = Path(__file__).resolve().parents[1]


def adjusted_rand(a, b) -> float:
    """Adjusted Rand index of two labelings (1: the same partition; about 0: chance)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.long)
    table.index_put_((a, b), torch.ones_like(a), accumulate=True)

    def pairs(x):
        return sum(comb(int(v), 2) for v in x.flatten())

    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), comb(a.numel(), 2)
    expected = rows * cols / total
    return (both - expected) / (0.5 * (rows + cols) - expected)


def labels(experts, width):
    out = torch.empty(width, dtype=torch.long)
    for e, row in enumerate(experts):
        out[row] = e
    return out


# --- the sketch -------------------------------------------------------------------------------------


def test_projection_is_a_seeded_rademacher_matrix():
    I, d = 512, 64
    omega = sketch_projection(I, d, seed=5)
    assert omega.shape == (I, d) and omega.dtype == torch.float32
    assert torch.equal(omega, sketch_projection(I, d, seed=5)), "not a pure function of (width, dim, seed)"
    assert not torch.equal(omega, sketch_projection(I, d, seed=6))
    assert set(omega.unique().tolist()) == {-(d**-0.5), d**-0.5}
    assert abs(float(omega.sign().mean())) < 0.02
    # nearly orthogonal columns of unit norm: E[Omega^T Omega] = (I / d) Id
    gram = omega.T @ omega * (d / I)
    assert torch.allclose(gram.diagonal(), torch.ones(d))
    off = gram - torch.eye(d)
    assert float(off.abs().max()) < 5 / I**0.5, float(off.abs().max())


def planted_activations(width=256, groups=8, tokens=2000, fire=0.5, noise=0.3, seed=0):
    """Signed activations whose positive pattern has ``groups`` planted groups of co-firing neurons:
    each token switches on each group with probability 1/4; a neuron of a switched-on group fires
    with probability ``fire``; every neuron also fires at random with probability ``noise``."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randperm(width, generator=g) % groups
    on = torch.rand(tokens, groups, generator=g) < 0.25
    fires = (on[:, truth] & (torch.rand(tokens, width, generator=g) < fire)) | (
        torch.rand(tokens, width, generator=g) < noise
    )
    act = torch.where(fires, torch.rand(tokens, width, generator=g) + 0.1, -torch.rand(tokens, width, generator=g))
    return act, fires, truth


def streamed_sketch(act, dim, seed=0, chunk=300, device="cpu"):
    """The sketch as calibration writes it: forwards of ``chunk`` tokens through ``on_layer``."""
    model = make_model(intermediate_size=act.shape[1], num_hidden_layers=1).to(device)
    stats = CalibrationStats(family_for(model), coactivation=True, coactivation_dim=dim, coactivation_seed=seed)
    for part in act.to(device).split(chunk):
        stats.on_layer(
            0, "und", torch.randn(len(part), model.config.hidden_size, device=device), None, None, {"act": part}
        )
    return Calibration.from_stats(stats, "und").coactivation("und", 0)


def test_streamed_sketch_is_the_projected_coactivation_matrix():
    act, fires, _ = planted_activations(width=128, tokens=700)
    sketch = streamed_sketch(act, dim=32, seed=1)
    B = fires.double()
    full = B.T @ B / B.shape[0]
    expect = full @ sketch_projection(128, 32, seed=1).double()
    assert sketch.shape == (128, 32)
    torch.testing.assert_close(sketch.double(), expect, rtol=1e-6, atol=1e-6)


def test_clustering_on_the_sketch_recovers_the_planted_groups():
    """Balanced k-means on the [I, 256] sketch finds the same experts as on the full [I, I] matrix
    (and the planted groups); with a far too narrow sketch it does not, so the check can fail."""
    I, E = 256, 8
    act, fires, truth = planted_activations(width=I, groups=E)
    B = fires.double()
    full = (B.T @ B / B.shape[0]).float()
    importance = torch.rand(I, generator=torch.Generator().manual_seed(1))
    scores = {}
    for name, coact in (
        ("full", full),
        ("sketch", streamed_sketch(act, CALIB_DEFAULTS["coactivation_dim"])),
        ("narrow", streamed_sketch(act, 4)),
    ):
        _, experts = partition_neurons(importance, E, method="cluster", coact=coact, seed=0)
        scores[name] = labels(experts, I)
    vs_truth = {k: adjusted_rand(v, truth) for k, v in scores.items()}
    vs_full = adjusted_rand(scores["sketch"], scores["full"])
    assert vs_truth["full"] == 1.0, vs_truth
    assert vs_full >= 0.95 and vs_truth["sketch"] >= 0.95, (vs_full, vs_truth)
    assert vs_truth["narrow"] < 0.5, f"the planted-groups check cannot tell a useless sketch: {vs_truth}"
    print(f"adjusted Rand: sketch vs full {vs_full:.4f}; vs planted groups {vs_truth}")


def test_a_calibration_file_with_the_full_matrix_still_clusters():
    """Files written before the sketch hold the full matrix under the old key: its rows are
    features as well, so cluster partitioning still works on them."""
    act, fires, truth = planted_activations(width=64, groups=4, tokens=800)
    B = fires.float()
    legacy = Calibration({f"gen.gen.{LEGACY_COACT_KEY}.0": B.T @ B / B.shape[0]}, "gen")
    assert legacy.coactivation("gen", 0).shape == (64, 64)
    _, experts = partition_neurons(torch.rand(64), 4, method="cluster", coact=legacy.coactivation("gen", 0))
    assert adjusted_rand(labels(experts, 64), truth) == 1.0
    new = Calibration({f"gen.gen.{SKETCH_KEY}.0": torch.ones(64, 8), **legacy.t}, "gen")
    assert new.coactivation("gen", 0).shape == (64, 8), "the sketch takes precedence"
    assert Calibration({}, "gen").coactivation("gen", 0) is None


# --- memory -----------------------------------------------------------------------------------------


def held_bytes(obj) -> int:
    """Bytes of every tensor reachable from ``obj``'s attributes (each storage once)."""
    seen, total, stack = set(), 0, [vars(obj)]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.untyped_storage().data_ptr() not in seen:
                seen.add(x.untyped_storage().data_ptr())
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack += list(x)
    return total


def peak_allocated(fn):
    """``fn()`` and the peak of bytes allocated by torch's CPU allocator while it ran, above the start
    (from the profiler's allocation and free events in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    current = peak = 0
    for _, nbytes in sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    ):
        current += nbytes
        peak = max(peak, current)
    return result, peak


def test_statistics_memory_is_flat_in_tokens_and_far_below_the_full_matrix():
    """MLP width 4096, co-activation on, 1x and 8x the calibration tokens: the statistics held
    afterwards are byte-for-byte the same size and a fraction of I*I*8 per layer, and the peak
    allocation while calibrating does not grow with tokens beyond one forward's activations."""
    I, L, bs = 4096, 2, 5
    model = make_model(intermediate_size=I, num_hidden_layers=L)
    runs = {}
    for factor in (1, 8):
        spec = dict(
            samples_per_prompt=factor, max_prompts_per_tag=1, num_steps=2, batch_size=bs, coactivation=True, threads=1
        )
        stats, peak = peak_allocated(lambda: run_calibration(model, "gen", spec))
        runs[factor] = dict(
            stats=stats,
            peak=peak,
            held=held_bytes(stats),
            tokens={c: float(stats.sums[c]["tokens"].sum()) for c in ("und", "gen")},
        )
    one, eight = runs[1], runs[8]
    assert all(eight["tokens"][c] == 8 * one["tokens"][c] > 0 for c in ("und", "gen")), (one["tokens"], eight["tokens"])
    d = CALIB_DEFAULTS["coactivation_dim"]
    full_matrix = I * I * 8
    numbers = (
        f"held {one['held']} B (1x, tokens {one['tokens']}) vs {eight['held']} B (8x, tokens {eight['tokens']}); "
        f"peak above start {one['peak']} B (1x) vs {eight['peak']} B (8x); "
        f"full co-activation matrix I*I*8 = {full_matrix} B per layer and tower"
    )
    assert one["held"] == eight["held"], numbers
    # sketches (per layer and tower) + one shared Omega + [I]-sized vectors
    assert one["held"] <= (2 * L + 1) * I * d * 4 + 4 * L * I * 8 + 4 * L * I * 4 + 4096, numbers
    assert one["held"] / L < full_matrix / 10, numbers
    one_forward = bs * 2 * model.config.num_latent_tokens * I * 4  # cond + uncond rows of one batch, fp32
    assert eight["peak"] - one["peak"] <= one_forward, numbers
    assert eight["peak"] < full_matrix, numbers
    print(numbers)


# --- provenance -------------------------------------------------------------------------------------


def test_sidecar_records_what_was_run(tmp_path, monkeypatch):
    model = make_model(intermediate_size=64, num_hidden_layers=2)
    save_model(model, tmp_path / "dense")
    gen_spec = dict(
        samples_per_prompt=2,
        max_prompts_per_tag=1,
        num_steps=3,
        cfg_scale=2.5,
        batch_size=4,
        coactivation=True,
        coactivation_dim=16,
        coactivation_seed=7,
        threads=1,
    )
    cli(
        "calibrate",
        tmp_path / "dense",
        "--task",
        "gen",
        "--spec",
        json.dumps(gen_spec),
        "--out",
        tmp_path / "gen.safetensors",
    )
    side = json.loads((tmp_path / "gen.safetensors.json").read_text())

    # the model hash: sha256 of the directory's SHA256SUMS, which lists the weights' own sha256
    manifest = (tmp_path / "dense" / MANIFEST).read_bytes()
    assert side["model_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert f"{sha256_file(tmp_path / 'dense' / 'model.safetensors')}  model.safetensors" in manifest.decode()

    pairs = shapes.geneval_set("calib", 2, 1, CALIB_DEFAULTS["gen_seed"])
    assert side["data"] == {
        "split": "calib",
        "batches": -(-len(pairs) // 4),
        "prompts": len({p.text for p, _ in pairs}),
        "images": len(pairs),
        "gen_seed": CALIB_DEFAULTS["gen_seed"],
        "max_prompts_per_tag": 1,
    }
    assert side["sampler"] == {
        "num_steps": 3,
        "cfg_scale": 2.5,
        "shift": float(model.config.timestep_shift),
        "cfg_interval": [0.0, 1.0],
        "cfg_renorm": "none",
        "cfg_renorm_min": 0.0,
        "samples_per_prompt": 2,
        "seeds": [s for _, s in pairs],
    }
    assert side["coactivation"] == {"key": SKETCH_KEY, "kind": "rademacher-hash32", "dim": 16, "seed": 7}
    assert side["spec"] == {**CALIB_DEFAULTS, **gen_spec}
    cal = Calibration.load(tmp_path / "gen.safetensors")
    assert cal.coactivation("gen", 1).shape == (64, 16)

    # understanding: the number of QA items (and their images) streamed; no sampler, no sketch
    und_spec = dict(qa_items=10, batch_size=4, threads=1)
    (tmp_path / "dense" / MANIFEST).unlink()  # a directory without a manifest: the weights are hashed instead
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")  # (loading it needs the user's opt-out)
    cli(
        "calibrate",
        tmp_path / "dense",
        "--task",
        "und",
        "--spec",
        json.dumps(und_spec),
        "--out",
        tmp_path / "und.safetensors",
    )
    side = json.loads((tmp_path / "und.safetensors.json").read_text())
    assert side["data"] == {
        "split": "calib",
        "batches": 3,
        "qa_items": 10,
        "images": 10,
        "qa_seed": CALIB_DEFAULTS["qa_seed"],
    }
    assert side["sampler"] is None and side["coactivation"] is None
    assert side["model_sha256"] is None
    assert side["model_state_sha256"] == state_digest(load_model(tmp_path / "dense"))


# --- settings ---------------------------------------------------------------------------------------


def test_schema_knows_every_calibration_setting():
    schema = config_schema(REPO / "workflow/schemas/config.schema.yaml")
    assert set(schema["properties"]["calibrate"]["properties"]) == set(CALIB_DEFAULTS)


def test_cluster_partitions_need_coactivation_in_the_config():
    config = yaml.safe_load((REPO / "workflow/config/micro.yaml").read_text())
    config["moe"]["partitions"][0]["method"] = "cluster"
    config["calibrate"]["coactivation"] = True
    check_config(config)
    config["calibrate"]["coactivation"] = False
    with pytest.raises(ConfigError, match=r"moe.partitions\[0\].method.*calibrate.coactivation"):
        check_config(config)


# --- on a GPU (skipped without one) -----------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU sketch checks skipped")
def test_sketch_on_cuda_matches_cpu_and_stays_flat_at_bagel_width():
    """Omega made on the GPU is the CPU's matrix; a sketch accumulated on the GPU matches the CPU's;
    at BAGEL's MLP width (18944) in bf16 the sketch is I*d*4 bytes and the peak per forward does
    not grow with the number of forwards."""
    width, d = 18944, CALIB_DEFAULTS["coactivation_dim"]
    assert torch.equal(sketch_projection(width, d, seed=3, device="cuda").cpu(), sketch_projection(width, d, seed=3))
    act, _, _ = planted_activations(width=256, tokens=900)
    torch.testing.assert_close(streamed_sketch(act, 64, device="cuda"), streamed_sketch(act, 64), rtol=1e-5, atol=1e-6)

    model = make_model(intermediate_size=width, num_hidden_layers=1).to("cuda", torch.bfloat16)
    stats = CalibrationStats(family_for(model), coactivation=True)
    tokens, H = 4096, model.config.hidden_size
    g = torch.Generator(device="cuda").manual_seed(0)
    act = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=g)
    h_in = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=g)
    peaks = []
    for forwards in (1, 8):
        for _ in range(forwards):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            stats.on_layer(0, "gen", h_in, None, None, {"act": act})
            torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
    sketch = stats.sums["gen"]["coact"][0]
    assert sketch.device.type == "cuda" and sketch.nbytes == width * d * 4
    assert peaks[1] <= peaks[0], peaks  # the last of 8 forwards needs no more than the first
    assert max(peaks) < width * width * 8, (peaks, width * width * 8)
    print(
        f"BAGEL width on {torch.cuda.get_device_name()}: sketch {sketch.nbytes} B, peak per forward of "
        f"{tokens} tokens {peaks} B (full matrix {width * width * 8} B)"
    )
