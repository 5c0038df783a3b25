"""Device and dtype are parameters (issue 9): every verb runs in bfloat16 on the CPU and scores within
0.05 of float32 on the same checkpoint; statistics and losses stay fp32; the device is checked."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.cli import cli
from helpers.models import MICRO_MODEL, make_model
from helpers.verb_chain import run_chain, score_differences, train_checkpoint
from unisparse.families import family_for
from unisparse.runtime import resolve_device, resolve_dtype

pytestmark = pytest.mark.slow  # two whole verb chains on a trained checkpoint (minutes): outside the fast inner loop


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    root = train_checkpoint(tmp_path_factory.mktemp("checkpoint"))
    return {
        dtype: (run_chain(root, tmp_path_factory.mktemp(dtype), "cpu", dtype), root)
        for dtype in ("float32", "bfloat16")
    }


def test_bfloat16_scores_within_0_05_of_float32(chains):
    fp32, bf16 = chains["float32"][0], chains["bfloat16"][0]
    diffs = score_differences(fp32, bf16)
    assert max(diffs.values()) <= 0.05, {k: round(v, 3) for k, v in diffs.items() if v > 0.05}
    assert {m["latency"]["dtype"] for m in bf16.values()} == {"bfloat16"}
    assert {m["latency"]["dtype"] for m in fp32.values()} == {"float32"}


def test_bfloat16_answers_and_images_agree_with_float32(chains):
    """The scores of a 300-step micro model are low, so compare what they are made of: the same
    answers on nearly every question, nearly the same images."""
    from unisparse.evaluate.generation import generate_for
    from unisparse.evaluate.understanding import answer_questions
    from unisparse.models.loading import load_model
    from unisparse.worlds import shapes

    root = chains["float32"][1]
    fp32 = load_model(root / "dense")
    bf16 = load_model(root / "dense", dtype=torch.bfloat16)
    items = shapes.qa_set("eval", 256, 1)
    same = sum(
        a == b for a, b in zip(answer_questions(family_for(fp32), items), answer_questions(family_for(bf16), items))
    ) / len(items)
    assert same >= 0.9, same
    pairs = shapes.geneval_set("eval", 1, 2, 0)
    images = [generate_for(family_for(m), pairs, dict(num_steps=8, cfg_scale=3.0)) for m in (fp32, bf16)]
    assert images[1].dtype == torch.float32
    assert (images[0] - images[1]).abs().mean() < 0.02, (images[0] - images[1]).abs().mean()


def test_bfloat16_artifacts_are_bfloat16_and_statistics_fp32(chains, tmp_path):
    out = tmp_path.parent
    bf16_dir = next(p for p in out.iterdir() if p.name.startswith("bfloat16"))
    weights = load_file(str(bf16_dir / "width/model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    stats = load_file(str(bf16_dir / "gen.safetensors"))
    assert {t.dtype for t in stats.values()} == {torch.float32}
    fp32_stats = load_file(str(next(p for p in out.iterdir() if p.name.startswith("float32")) / "gen.safetensors"))
    cos = "gen.gen.cos_block_ld"
    assert torch.allclose(stats[cos], fp32_stats[cos], atol=0.02), (stats[cos], fp32_stats[cos])
    summary = json.loads((bf16_dir / "full-summary.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])


def test_train_tiny_in_bfloat16(tmp_path):
    cli(
        "train-tiny",
        "--model",
        json.dumps(MICRO_MODEL),
        "--train",
        json.dumps({"steps": 3, "batch_und": 4, "batch_gen": 4}),
        "--out",
        tmp_path / "m",
        "--summary",
        tmp_path / "s.json",
        "--dtype",
        "bfloat16",
    )
    assert {t.dtype for t in load_file(str(tmp_path / "m/model.safetensors")).values()} == {torch.bfloat16}
    assert all(
        h["ce"] == h["ce"] and h["mse"] == h["mse"] for h in json.loads((tmp_path / "s.json").read_text())["history"]
    )


def test_sampling_noise_is_drawn_on_the_cpu_then_moved():
    """Per-sample seeds give the same noise whatever the batch and the device: generate_images draws
    on the CPU; here the same images alone and in a batch, in fp32."""
    model = make_model()
    both = model.generate_images([[5, 6], [7]], [11, 12], num_steps=2, cfg_scale=2.0)
    alone = model.generate_images([[7]], [12], num_steps=2, cfg_scale=2.0)
    assert torch.allclose(both[1], alone[0], atol=1e-6)


def test_runtime_values_are_checked():
    assert resolve_device("cpu").type == "cpu" and resolve_dtype("bfloat16") is torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device must be"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8")
