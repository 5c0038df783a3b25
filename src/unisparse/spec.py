"""Settings sections (a config section handed to a stage) merged over the stage's defaults."""
from __future__ import annotations


def merge_spec(defaults: dict, spec: dict | None, what: str) -> dict:
    """``defaults`` updated with ``spec``; a key the stage does not know is an error naming it."""
    spec = spec or {}
    unknown = set(spec) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}")
    return {**defaults, **spec}
