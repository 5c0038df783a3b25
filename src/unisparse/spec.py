"""Settings sections (a config section handed to a stage) merged over the stage's defaults."""
from __future__ import annotations


def _type_ok(default, value) -> bool:
    """A value may replace a default of the same kind (an int where a float is expected is fine);
    a default of None accepts anything (the stage checks it)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    return isinstance(value, type(default))


def merge_spec(defaults: dict, spec: dict | None, what: str) -> dict:
    """``defaults`` updated with ``spec``; a key the stage does not know, or a value of the wrong
    type, is an error naming the key."""
    spec = spec or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{what} settings must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}; known: {sorted(defaults)}")
    for key, value in spec.items():
        if not _type_ok(defaults[key], value):
            raise ValueError(f"{what} setting {key}={value!r}: expected {type(defaults[key]).__name__}")
    return {**defaults, **spec}
