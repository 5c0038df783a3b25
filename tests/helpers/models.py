"""Small models for the tests: a random MoT model in memory, the micro model the verb tests train,
and saved dense models with their calibrations."""

import torch

from unisparse.calibrate import run_calibration, save_stats
from unisparse.io import directory_digest, save_model
from unisparse.models.configuration_mot import MoTConfig
from unisparse.models.modeling_mot import MoTForUnifiedModel
from unisparse.tasks import model_config_kwargs

#: the micro model the CLI verb tests train (``train-tiny --model``)
MICRO_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vit_patch_size": 8,
}
#: the calibration ``save_calibration`` runs (a few items: the statistics' shapes matter, not their values)
CALIBRATION = {"qa_items": 8, "samples_per_prompt": 1, "max_prompts_per_tag": 1, "num_steps": 2}


def make_model(seed=0, **overrides):
    """A random 3-layer MoT model (``overrides`` change its config), in eval mode."""
    torch.manual_seed(seed)
    spec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    spec.update(overrides)
    model = MoTForUnifiedModel(MoTConfig(**{**spec, **model_config_kwargs()}))
    # random (not identity) norms and biases so tests exercise every weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_dense(path, seed=0, **overrides):
    """``make_model(seed, **overrides)`` saved to ``path``; the model."""
    model = make_model(seed, **overrides)
    save_model(model, path)
    return model


def save_calibration(model, model_dir, path, task="gen"):
    """``model``'s calibration for ``task``, saved to ``path`` naming the saved ``model_dir``."""
    save_stats(run_calibration(model, task, CALIBRATION), task, path, model_sha256=directory_digest(model_dir))
