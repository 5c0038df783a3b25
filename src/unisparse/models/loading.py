"""Load a model directory written by the pipeline: the class comes from the saved config through
transformers' Auto registration (``modeling_mot`` registers the MoT when imported), never from the caller."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

from ..io import IntegrityError, check_weights_match, verify_model_dir
from . import modeling_mot  # noqa: F401  (registers the MoT's config type with the Auto classes)

log = logging.getLogger(__name__)


def model_class_for(config):
    """The ``PreTrainedModel`` class registered for a config's type."""
    try:
        return AutoModel._model_mapping[type(config)]
    except KeyError:
        raise IntegrityError(f"no model class is registered for model type {config.model_type!r}") from None


def load_model(model_dir, device=None, dtype=None, **kwargs):
    """Load a model directory onto ``device`` in ``dtype`` (default: CPU, the stored dtype): safetensors
    only (never pickle), content verified against ``SHA256SUMS`` (required: ``io.verify_model_dir``), and strict (see
    ``io.check_weights_match``)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir} holds no .safetensors weights")
    verify_model_dir(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, TypeError, OSError, KeyError) as e:
        raise IntegrityError(f"{model_dir}/config.json: {e}") from None
    model_class = model_class_for(config)
    with torch.device("meta"):
        skeleton = model_class(config)
    check_weights_match(model_dir, skeleton)
    model = model_class.from_pretrained(model_dir, config=config, use_safetensors=True, **kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


def empty_model(model_dir, dtype=None):
    """The model of ``model_dir`` with its parameters on the meta device (buffers real), its files'
    headers checked strictly against it, nothing read: a sharded run's starting point. The manifest
    is verified by the caller once (``io.verify_model_dir``), not by every rank."""
    from ..sharding import parameters_on_meta

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, TypeError, OSError, KeyError) as e:
        raise IntegrityError(f"{model_dir}/config.json: {e}") from None
    with parameters_on_meta():
        model = model_class_for(config)(config)
    check_weights_match(model_dir, model)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
