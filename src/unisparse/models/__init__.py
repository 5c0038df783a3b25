"""The BAGEL-architecture Mixture-of-Transformers and its configuration."""
from transformers import AutoConfig, AutoModel

from .configuration_mot import COMPONENTS, SKIPPED_ATTENTION_KV, SUBLAYERS, SUFFIX, MoTConfig, check_component
from .loading import load_model
from .modeling_mot import GEN, PAD, UND, MoTForUnifiedModel
from .sampling import SAMPLER_DEFAULTS, sampler_settings

AutoConfig.register(MoTConfig.model_type, MoTConfig, exist_ok=True)
AutoModel.register(MoTConfig, MoTForUnifiedModel, exist_ok=True)

__all__ = ["COMPONENTS", "SKIPPED_ATTENTION_KV", "SUBLAYERS", "SUFFIX", "MoTConfig", "MoTForUnifiedModel", "check_component", "UND", "GEN", "PAD", "SAMPLER_DEFAULTS", "sampler_settings", "load_model"]
