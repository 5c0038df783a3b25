"""Checks of a pipeline config, run when Snakemake builds the DAG (before any job).

The JSON schema (workflow/schemas/config.schema.yaml) checks each value on its own (types, ranges,
and the allowed values, which it takes from ``unisparse.choices``: ``config_schema`` fills them in,
``validate_config`` validates against the result). What depends on two values (a depth drop against
the number of layers, a shared expert against the MLP width, a path setting against the directory
DVC versions) is checked by ``check_config``, so a bad config fails before the first job, with the
key named, instead of inside a job after earlier jobs ran. Library-side checks
(``MoTConfig.validate_structure``, ``check_partition_sizes``) are reused, not restated.
Pure Python (no torch): Snakemake imports this module at DAG-build time.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from . import choices
from .sizes import GEOMETRY_DEFAULTS, check_model_sizes, check_partition_sizes, moe_layers

#: path settings and the directory each must lie inside (DVC versions results/; logs/ is ignored)
PATH_ROOTS = {"results_dir": "results", "logs_dir": "logs"}
#: characters allowed in a path setting: they reach shell commands, file names and DVC
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/-]+$")


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key."""


def choice_values(name: str) -> tuple:
    """The allowed values ``name`` stands for: a tuple of ``unisparse.choices`` (``"ROUTERS"``) or
    one entry of a dict of tuples there (``"BENCHMARKS.gen"``)."""
    attr, _, key = name.partition(".")
    values = getattr(choices, attr, None) if attr.isupper() else None
    if isinstance(values, dict) and key:
        values = values.get(key)
    elif key:
        values = None
    if not (isinstance(values, tuple) and values and all(isinstance(v, str) for v in values)):
        raise ValueError(f"schema: `choices: {name}` names no tuple of values in unisparse.choices")
    return values


def fill_choices(node):
    """A copy of a schema with every ``{choices: NAME, ...}`` turned into ``{enum: [...], ...}``
    (only where ``choices`` holds a string: a config key named ``choices`` would hold a schema)."""
    if isinstance(node, dict):
        out = {k: fill_choices(v) for k, v in node.items() if not (k == "choices" and isinstance(v, str))}
        if isinstance(node.get("choices"), str):
            if "enum" in node:
                raise ValueError(f"schema: both `choices: {node['choices']}` and an enum")
            out["enum"] = list(choice_values(node["choices"]))
        return out
    if isinstance(node, list):
        return [fill_choices(v) for v in node]
    return node


def config_schema(path) -> dict:
    """The config schema at ``path`` (YAML), with the allowed values of ``unisparse.choices`` filled in."""
    import yaml

    return fill_choices(yaml.safe_load(Path(path).read_text()))


def key_path(path) -> str:
    """A config key as the user writes it: ``depth.sweeps[0].drop``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "config"


def validate_config(config: dict, schema_path) -> None:
    """Validate ``config`` against the schema (``config_schema``), filling in the schema's defaults
    as Snakemake's ``validate`` does; ``ConfigError`` naming the key of the most relevant error."""
    from jsonschema import validators
    from jsonschema.exceptions import best_match

    schema = config_schema(schema_path)
    base = validators.validator_for(schema)
    base.check_schema(schema)
    check_properties = base.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    validator = validators.extend(base, {"properties": properties_with_defaults})(schema)
    error = best_match(validator.iter_errors(config))
    if error is None:
        return
    # "not valid under any of the given schemas" (a value or a list of values): say what the value
    # failed in the alternative of its type (an unknown value, not "is not of type 'array'")
    while error.context and (relevant := [e for e in error.context if e.validator != "type"]):
        error = best_match(relevant)
    raise ConfigError(f"{key_path(error.absolute_path)}: {error.message}")


def check_path_setting(key: str, value) -> str:
    """``value`` normalised; refused unless a relative path inside ``PATH_ROOTS[key]``."""
    root = PATH_ROOTS[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty path inside {root}/, got {value!r}")
    if not _SAFE_PATH.match(value):
        bad = sorted({c for c in value if not re.match(r"[A-Za-z0-9._/-]", c)})
        raise ConfigError(f"{key}: {value!r} contains {''.join(bad)!r}; only letters, digits, '.', '_', '-' and '/' "
                          f"are allowed (the path reaches shell commands and DVC)")
    if value.startswith("/") or ".." in value.split("/"):
        raise ConfigError(f"{key}: {value!r} must be a relative path inside {root}/ without '..'")
    norm = posixpath.normpath(value)
    if norm != root and not norm.startswith(root + "/"):
        raise ConfigError(f"{key}: {value!r} must lie inside {root}/ ({'DVC versions only results/' if root == 'results' else 'logs are kept there'})")
    return norm


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _check_model(model: dict) -> None:
    from .worlds.scenes import CANVAS  # the embedded default's image size (tasks.model_config_kwargs)

    geometry = {**GEOMETRY_DEFAULTS, **{k: v for k, v in model.items() if k in GEOMETRY_DEFAULTS}}
    try:
        check_model_sizes(model["num_hidden_layers"], model["num_attention_heads"], model["num_key_value_heads"],
                          CANVAS, **geometry)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def component_sizes(model: dict) -> dict:
    """``{component: (layers, MLP width)}`` the grids are planned with: a MoT's one layer count (and
    its towers' widths), or another family's per-component ``layers`` and ``mlp_width``."""
    if model.get("family", "mot") == "mot":
        widths = {"und": model["intermediate_size"], "gen": model.get("gen_intermediate_size", model["intermediate_size"])}
        return {c: (model["num_hidden_layers"], widths[c]) for c in choices.COMPONENTS}
    return {c: (model["layers"][c], model["mlp_width"][c]) for c in choices.COMPONENTS}


def _layers_key(model: dict, component: str) -> str:
    return "model.num_hidden_layers" if model.get("family", "mot") == "mot" else f"model.layers.{component}"


def _check_depth(config: dict, sizes: dict) -> None:
    for i, sweep in enumerate(config.get("depth", {}).get("sweeps", [])):
        for component in _as_list(sweep["component"]):
            layers = sizes[component][0]
            # a component has `layers` blocks, attention or MLP sublayers, and twice that many sublayers
            limit = 2 * layers if _as_list(sweep["granularity"]) == ["sublayer"] else layers
            for drop in _as_list(sweep["drop"]):
                if drop > limit:
                    raise ConfigError(f"depth.sweeps[{i}].drop: cannot drop {drop} sublayers of a {component} component "
                                      f"with {_layers_key(config['model'], component)}={layers} "
                                      f"(granularity {sweep['granularity']})")


def _check_moe(config: dict, sizes: dict) -> None:
    moe = config.get("moe")
    if not moe:
        return
    layers, width = sizes[moe.get("component", "gen")]
    for i, part in enumerate(moe["partitions"]):
        E, k, shared = part["num_experts"], part["top_k"], part.get("shared_size", 0)
        if k > E:
            raise ConfigError(f"moe.partitions[{i}].top_k: top_k={k} exceeds num_experts={E}")
        try:
            check_partition_sizes(width, E, shared)
        except ValueError as e:
            key = "shared_size" if not 0 <= shared < width else "num_experts"
            raise ConfigError(f"moe.partitions[{i}].{key}: {e}") from None
        if part.get("method") == "cluster" and config.get("calibrate", {}).get("coactivation") is not True:
            raise ConfigError(f"moe.partitions[{i}].method: 'cluster' needs co-activation statistics; set "
                              "calibrate.coactivation: true")
    dense = moe.get("dense_layers", "first_last")
    try:
        converted = moe_layers(layers, dense)
    except ValueError as e:
        raise ConfigError(f"moe.dense_layers: {e}") from None
    if moe["partitions"] and not converted:
        raise ConfigError(f"moe.dense_layers: {dense!r} keeps every one of the {layers} layers dense; nothing to convert")
    for tuning in moe["tunings"]:
        if tuning != "none" and tuning not in moe.get("tune", {}):
            raise ConfigError(f"moe.tune.{tuning}: missing, but moe.tunings lists {tuning!r} (give its settings, "
                              f"e.g. `{tuning}: {{steps: 100}}`)")
    if moe.get("controls") and "full" not in moe.get("tune", {}):
        raise ConfigError(f"moe.tune.full: missing, but moe.controls lists {moe['controls']} (the controls get the "
                          "MoE's full tuning; give its settings, e.g. `full: {steps: 100}`)")
    if "full" in moe["tunings"] and moe.get("full_init", "frozen") == "frozen" and "frozen" not in moe["tunings"]:
        raise ConfigError("moe.full_init: 'frozen' (full tuning starts from the router-tuned model) needs 'frozen' "
                          "in moe.tunings")


def _check_train(config: dict) -> None:
    weights = config.get("train", {}).get("qa_weights")
    if weights is not None and len(weights) != len(choices.QA_TYPES):
        raise ConfigError(f"train.qa_weights: needs one weight per ShapesQA type {list(choices.QA_TYPES)}, "
                          f"got {len(weights)}")


def check_config(config: dict) -> None:
    """Raise ``ConfigError`` naming the key for anything that would fail only inside a job."""
    for key in PATH_ROOTS:
        check_path_setting(key, config.get(key, PATH_ROOTS[key]))
    _check_train(config)
    if config["model"].get("family", "mot") == "mot":
        _check_model(config["model"])
        for stage in ("evaluate", "calibrate"):  # QwenImagePipeline's own rescale exists in that family only
            if config.get(stage, {}).get("cfg_renorm") == "pipeline":
                raise ConfigError(f"{stage}.cfg_renorm: 'pipeline' is the Qwen-Image family's guidance rescale; "
                                  f"a MoT takes {list(choices.MOT_RENORMS)}")
    sizes = component_sizes(config["model"])
    _check_depth(config, sizes)
    _check_moe(config, sizes)
