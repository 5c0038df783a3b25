import pytest
import torch

from unisparse.models.configuration_mot import MoTConfig
from unisparse.models.modeling_mot import MoTForUnifiedModel
from unisparse.tasks import model_config_kwargs


def make_model(seed=0, **overrides):
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


@pytest.fixture
def tiny_model():
    return make_model()
