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


def test_killed_training_resumes_to_identical_weights_and_history(tmp_path):
    """train-tiny runs the same loop as tuning: a run stopped after a checkpoint resumes to the
    weights and the loss history of an uninterrupted run."""
    spec = dict(steps=8, batch_und=4, batch_gen=4, threads=1, checkpoint_every=3)
    straight = train_tiny(MICRO, spec, tmp_path / "a", progress=False)
    train_tiny(MICRO, spec, None, progress=False, checkpoint_dir=tmp_path / "ck", stop_after=5)
    resumed = train_tiny(MICRO, spec, tmp_path / "b", progress=False, checkpoint_dir=tmp_path / "ck")
    assert resumed["resumed_from"] == 3
    a, b = (load_file(tmp_path / x / "model.safetensors") for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == straight["history"]


def test_training_checkpoint_of_other_settings_is_not_resumed(tmp_path, caplog):
    spec = dict(steps=8, batch_und=4, batch_gen=4, threads=1, checkpoint_every=3)
    train_tiny(MICRO, spec, None, progress=False, checkpoint_dir=tmp_path / "ck", stop_after=5)
    with caplog.at_level("WARNING"):
        summary = train_tiny(
            MICRO, {**spec, "lr": 2e-3}, tmp_path / "b", progress=False, checkpoint_dir=tmp_path / "ck"
        )
    assert summary["resumed_from"] == 0 and "other settings" in caplog.text
