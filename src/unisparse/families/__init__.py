"""Model families behind one adapter (``base.Family``): the algorithms see models only through it.

``load_family`` picks the family from what a model directory holds; ``family_for`` wraps a model
already in memory. A family's module is imported only when a model of that family is used (Qwen-Image
needs diffusers; the MoT does not).
"""

from __future__ import annotations

import importlib

from ..choices import SUBLAYERS
from .base import Family, ImageGeometry, LayerObserver

#: registered families: name -> ("module:Class", the file that marks its model directories); a new
#: family adds one line here. The marker lets a directory be matched without importing every family.
FAMILIES = {
    "qwen_image": ("unisparse.families.qwen_image:QwenImageFamily", "model_index.json"),
    "mot": ("unisparse.families.mot:MoTFamily", "config.json"),
}


def family_class(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {sorted(FAMILIES)}")
    module, cls = FAMILIES[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def family_name_of(model_dir) -> str:
    """The family whose files a model directory holds (``FileNotFoundError`` naming the directory if none)."""
    from pathlib import Path

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir} is not a model directory")
    for name, (_, marker) in FAMILIES.items():
        if (Path(model_dir) / marker).is_file() and family_class(name).is_model_dir(model_dir):
            return name
    raise FileNotFoundError(
        f"{model_dir} is not a model directory of any registered family {sorted(FAMILIES)} "
        "(a MoT directory has config.json; a Qwen-Image one model_index.json)"
    )


def load_family(model_dir, device=None, dtype=None) -> Family:
    """The model in ``model_dir`` on ``device`` in ``dtype``, wrapped in its family's adapter, with the
    tokenizer that travels with it."""
    from ..deltas import is_delta_dir

    if is_delta_dir(model_dir):  # a derived model stored as its parent plus what differs
        import tempfile
        from pathlib import Path

        from ..deltas import materialise

        with tempfile.TemporaryDirectory(prefix="unisparse-delta-") as tmp:
            full = materialise(model_dir, Path(tmp) / "model", layout_of(model_dir))
            family = family_class(family_name_of(full)).load(full, device=device, dtype=dtype)
            return family
    return family_class(family_name_of(model_dir)).load(model_dir, device=device, dtype=dtype)


def layout_of(model_dir) -> list:
    """Where the family of ``model_dir`` keeps which tensors (``Family.weight_layout``)."""
    return family_class(family_name_of(model_dir)).weight_layout()


def family_for(model, tokenizer=None) -> Family:
    """Wrap a model in memory (library use): a ``Family`` is returned as is."""
    if isinstance(model, Family):
        return model
    from ..models.modeling_mot import MoTForUnifiedModel

    if isinstance(model, MoTForUnifiedModel):
        from ..text import tokenizer_for
        from .mot import MoTFamily

        return MoTFamily(model, tokenizer or tokenizer_for(None))
    raise TypeError(f"no family adapter for {type(model).__name__}; wrap it in a families.Family")


def require_family(family, what: str) -> Family:
    """``family`` itself, or a TypeError: internals take a ``Family``; a model becomes one once, at the
    public entry point (``family_for``), never again on the way down."""
    if not isinstance(family, Family):
        raise TypeError(
            f"{what} takes a families.Family, got {type(family).__name__} (wrap a model once: "
            "unisparse.families.family_for(model))"
        )
    return family


def like_given(result: Family, given):
    """An algorithm's result in the form its caller gave the input: a ``Family`` for a ``Family``,
    the bare model for a bare model (library users keep working with their own objects)."""
    return result if isinstance(given, Family) else result.model


__all__ = [
    "FAMILIES",
    "Family",
    "ImageGeometry",
    "LayerObserver",
    "SUBLAYERS",
    "family_class",
    "family_for",
    "family_name_of",
    "like_given",
    "load_family",
    "require_family",
]
