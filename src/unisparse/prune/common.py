"""Rebuild a model under a changed config and carry its weights over exactly."""
from __future__ import annotations

import copy

import torch

from ..models import MoTConfig, MoTForUnifiedModel


def derived_config(model, **changes) -> MoTConfig:
    data = copy.deepcopy(model.config.to_dict())
    for key in ("architectures", "transformers_version", "model_type"):
        data.pop(key, None)
    data.update(changes)
    return MoTConfig(**data)


def restructure(model, config: MoTConfig, transform=None) -> MoTForUnifiedModel:
    """A new model with ``config``; weights copied from ``model`` (optionally transformed).

    Every parameter of the new model must come from the old state dict: keys the new structure does
    not have are dropped (removed sublayers); a missing key is an error, never a silent re-init.
    """
    state = model.state_dict()
    if transform is not None:
        state = transform(state)
    with torch.device("meta"):
        new = MoTForUnifiedModel(config)
    wanted = new.state_dict().keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise RuntimeError(f"restructure: no weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    new = new.to_empty(device=model.device)
    new.load_state_dict({k: state[k].detach().clone() for k in wanted}, strict=True, assign=True)
    new.eval()
    return new
