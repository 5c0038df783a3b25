"""Settings sections (a config section handed to a stage) merged over the stage's defaults.

One rule for numbers, shared with the config schema: a non-finite number (nan, inf; JSON's ``NaN`` and
``Infinity`` arrive as floats) is refused wherever it appears, lists and nested mappings included, and
every numeric setting must lie in its range of ``unisparse.ranges`` (the schema's bounds come from
there too), so a setting that cannot produce work is refused before any model is loaded.
"""

from __future__ import annotations

import json
import math

import yaml

from . import ranges


class DuplicateKeyError(ValueError):
    """A JSON/YAML mapping gives a key twice (both formats would silently keep the last)."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(default, value) -> bool:
    """A value may replace a default of the same kind (an int where a float is expected is fine);
    a list default (``cfg_interval``) takes a list as long, of the same kinds; a default of None
    accepts anything (the stage checks it). Non-finite numbers are refused by ``non_finite``."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, list) and default:
        return isinstance(value, list) and len(value) == len(default) and all(map(_type_ok, default, value))
    return isinstance(value, type(default))


def non_finite(value, path: str = ""):
    """``(path, number)`` of the first nan or inf inside ``value`` (path ``""`` for ``value`` itself,
    else ``[1]``, ``.key``, ...), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = non_finite(v, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}")
        if found is not None:
            return found
    return None


def check_range(key: str, value, b: dict, nullable: bool, what: str) -> None:
    """``value`` (a number, or a list of numbers) within the bounds ``b``, else a ValueError naming it."""
    if value is None and nullable:
        return
    numbers = value if isinstance(value, list) else [value]
    for i, v in enumerate(numbers):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if not _is_number(v):
            raise ValueError(f"{what} setting {where}={v!r}: expected a number{' or null' if nullable else ''}")
        if not ranges.within(v, b):
            raise ValueError(f"{what} setting {where}={v!r}: must be {ranges.describe(b)}")


def merge_spec(defaults: dict, spec: dict | None, what: str, kind: str | None = None) -> dict:
    """``defaults`` updated with ``spec``; a key the stage does not know, a value of the wrong type,
    a non-finite number or a value outside its range is an error naming the key. The ranges and the
    keys that may be null are those of ``unisparse.ranges`` for ``kind`` (default: ``what``,
    e.g. "training")."""
    spec = spec or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{what} settings must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}; known: {sorted(defaults)}")
    kind = kind or what
    nullable = ranges.NULLABLE.get(kind, set())
    for key, value in spec.items():
        bad = non_finite(value)
        if bad is not None:
            raise ValueError(f"{what} setting {key}{bad[0]}={bad[1]!r}: not a finite number (nan and inf are refused)")
        if not (value is None and key in nullable) and not _type_ok(defaults[key], value):
            raise ValueError(f"{what} setting {key}={value!r}: expected {type(defaults[key]).__name__}")
    merged = {**defaults, **spec}
    for key, b in ranges.RANGES.get(kind, {}).items():
        if key in spec or (key in merged and merged[key] is not None):  # a default of None: "not given"
            check_range(key, merged[key], b, key in nullable, what)
    return merged


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key given twice (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: overriding merged keys is fine
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(
                        f"{key}: duplicate key in {self.name} (line {line}, first given on "
                        f"line {seen[key]}); YAML would silently keep the last"
                    )
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep)


def _refuse_duplicate_pairs(path):
    """A ``json.loads`` object hook refusing a key given twice in one object."""

    def hook(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise DuplicateKeyError(f"{twice[0]}: duplicate key in {path}; JSON would silently keep the last")
        return dict(pairs)

    return hook


def load_yaml_strict(text: str, name: str = "<string>"):
    """``text`` parsed as JSON if it is JSON, else as YAML (Snakemake's order), refusing duplicate keys
    (``DuplicateKeyError`` naming the key and ``name``)."""
    try:
        json.loads(text)
    except ValueError:
        loader = _StrictLoader(text)
        loader.name = name
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    return json.loads(text, object_pairs_hook=_refuse_duplicate_pairs(name))
