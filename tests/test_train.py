import torch
from safetensors.torch import load_file

from unisparse.train import lr_at, train_tiny

MICRO = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def test_same_seed_gives_identical_weights(tmp_path):
    spec = dict(steps=6, batch_und=4, batch_gen=4, threads=1)
    train_tiny(MICRO, spec, tmp_path / "a", progress=False)
    train_tiny(MICRO, spec, tmp_path / "b", progress=False)
    train_tiny(MICRO, {**spec, "seed": 1}, tmp_path / "c", progress=False)
    a, b, c = (load_file(tmp_path / x / "model.safetensors") for x in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_one_cycle_schedule():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.05) for s in range(100)]
    assert max(lrs) == 1.0 and lrs[0] < 0.2 and abs(lrs[-1] - 0.05) < 0.01


def test_unknown_setting_is_named(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown training keys: \\['stpes'\\]"):
        train_tiny(MICRO, {"stpes": 3}, tmp_path / "x", progress=False)
