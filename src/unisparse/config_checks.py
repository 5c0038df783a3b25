"""Checks of a pipeline config, run when Snakemake builds the DAG (before any job).

The JSON schema (workflow/schemas/config.schema.yaml) checks each value on its own (types, ranges,
and the allowed values, which it takes from ``unisparse.choices``: ``config_schema`` fills them in,
``validate_config`` validates against the result). What depends on two values (a depth drop against
the number of layers, a shared expert against the MLP width, a path setting against the directory
DVC versions) is checked by ``check_config``, so a bad config fails before the first job, with the
key named, instead of inside a job after earlier jobs ran. Numbers follow one rule, shared with every
verb's settings (``spec.merge_spec``): nothing non-finite anywhere (``validate_config`` walks the whole
config first: JSON-schema bounds never reject NaN), and each stage setting's range comes from
``unisparse.ranges`` (a schema node ``range: training.lr``, filled in by ``config_schema``). Every
``pattern`` of the schema must match the whole string, and config files are read with duplicate keys
refused (``check_config_file``). Library-side checks
(``MoTConfig.validate_structure``, ``check_partition_sizes``) are reused, not restated.
Pure Python (no torch): Snakemake imports this module at DAG-build time.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

import yaml

from . import choices, ranges
from .sizes import GEOMETRY_DEFAULTS, check_model_sizes, check_partition_sizes, moe_layers
from .spec import DuplicateKeyError, load_yaml_strict, non_finite

#: path settings and the directory each must lie inside (DVC versions results/; logs/ is ignored)
PATH_ROOTS = {"results_dir": "results", "logs_dir": "logs"}
#: characters allowed in a path setting: they reach shell commands, file names and DVC
_SAFE_PATH = re.compile(r"[A-Za-z0-9._/-]+")  # full match only: `$` would let a trailing newline through
#: the wildcard spelling of a width sweep's keep_ratio in its output path (rules/width.smk's constraint)
KEEP_RATIO_WILDCARD = r"[0-9.]+"
#: the largest model a config may plan: a trillion parameters (4 TB in float32, 2 TB in bfloat16) is
#: beyond the memory of any machine this pipeline runs on (BAGEL-7B-MoT has 1.4e10); a larger size is a
#: typo that would otherwise end in a raw allocator error inside the first job
MAX_PARAMETERS = 10**12
#: parameter dtypes that cannot train (``trainloop.check_trainable_dtype``: AdamW underflows in float16)
UNTRAINABLE_DTYPES = ("float16",)


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


def fill_ranges(node):
    """A copy of a schema with every ``{range: KIND.KEY, ...}`` given the bounds of ``unisparse.ranges``
    (``minimum`` / ``exclusiveMinimum`` / ``maximum``); a bound written beside it is an error (the
    range is defined once)."""
    if isinstance(node, dict):
        out = {k: fill_ranges(v) for k, v in node.items() if not (k == "range" and isinstance(v, str))}
        if isinstance(node.get("range"), str):
            if {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"} & set(node):
                raise ValueError(f"schema: `range: {node['range']}` beside a bound written out")
            out.update(ranges.bounds(node["range"]))
        return out
    if isinstance(node, list):
        return [fill_ranges(v) for v in node]
    return node


def check_config_file(path) -> dict:
    """A config file as Snakemake reads it, but with a key given twice refused, naming key and file
    (Snakemake's own loader keeps the last silently: `steps: 40, steps: 4000` ran 4000 steps)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"configfile {path}: {e.strerror or e}") from None
    try:
        return load_yaml_strict(text, str(path))
    except DuplicateKeyError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"configfile {path}: not valid YAML ({str(e).splitlines()[0]})") from None


def config_schema(path) -> dict:
    """The config schema at ``path`` (YAML), with the allowed values of ``unisparse.choices`` and the
    ranges of ``unisparse.ranges`` filled in."""
    return fill_ranges(fill_choices(load_yaml_strict(Path(path).read_text(), str(path))))


def key_path(path) -> str:
    """A config key as the user writes it: ``depth.sweeps[0].drop``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "config"


def validate_config(config: dict, schema_path) -> None:
    """Validate ``config`` against the schema (``config_schema``), filling in the schema's defaults
    as Snakemake's ``validate`` does; ``ConfigError`` naming the key of the most relevant error.
    First, anywhere in the config, a non-finite number is refused (``check_finite``); a ``pattern``
    must match the whole string (JSON schema's is a search, where ``$`` matches before a trailing
    newline, so ``results/x`` and a newline would pass ``^...$``)."""
    from jsonschema import ValidationError, validators
    from jsonschema.exceptions import best_match

    check_finite(config)
    schema = config_schema(schema_path)
    base = validators.validator_for(schema)
    base.check_schema(schema)
    check_properties = base.VALIDATORS["properties"]

    def full_pattern(validator, pattern, instance, schema):
        if validator.is_type(instance, "string") and not re.fullmatch(pattern, instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r} (the whole string)")

    def properties_with_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    validator = validators.extend(base, {"properties": properties_with_defaults, "pattern": full_pattern})(schema)
    error = best_match(validator.iter_errors(config))
    if error is None:
        return
    # "not valid under any of the given schemas" (a value or a list of values): say what the value
    # failed in the alternative of its type (an unknown value, not "is not of type 'array'")
    while error.context and (relevant := [e for e in error.context if e.validator != "type"]):
        error = best_match(relevant)
    raise ConfigError(f"{key_path(error.absolute_path)}: {error.message}")


def check_finite(config: dict) -> None:
    """``ConfigError`` naming the key (``evaluate.cfg_interval[1]``) of the first nan or inf anywhere in
    ``config``: the schema's bounds never reject NaN, and inf passes ``exclusiveMinimum: 0``."""
    bad = non_finite(config)
    if bad is not None:
        raise ConfigError(f"{bad[0].lstrip('.')}: {bad[1]!r} is not a finite number (nan and inf are refused)")


def check_path_setting(key: str, value) -> str:
    """``value`` normalised; refused unless a relative path inside ``PATH_ROOTS[key]``."""
    root = PATH_ROOTS[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty path inside {root}/, got {value!r}")
    if not _SAFE_PATH.fullmatch(value):
        bad = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9._/-]", c)})
        raise ConfigError(
            f"{key}: {value!r} contains {''.join(bad)!r}; only letters, digits, '.', '_', '-' and '/' "
            f"are allowed (the path reaches shell commands and DVC)"
        )
    if value.startswith("/") or ".." in value.split("/"):
        raise ConfigError(f"{key}: {value!r} must be a relative path inside {root}/ without '..'")
    norm = posixpath.normpath(value)
    if norm != root and not norm.startswith(root + "/"):
        why = "DVC versions only results/" if root == "results" else "logs are kept there"
        raise ConfigError(f"{key}: {value!r} must lie inside {root}/ ({why})")
    return norm


def _as_list(value):
    return value if isinstance(value, list) else [value]


def estimate_parameters(model: dict) -> int:
    """A lower estimate of the parameter count ``model:`` plans: for a MoT, both towers' attention
    (q, o: hidden x hidden; k, v: hidden x kv width) and MLPs (3 x hidden x width) in every layer, plus
    the vision connector; for another family, 3 x width per MLP and layer (its hidden size is not in
    the config). Embeddings and norms are left out: it only has to catch sizes no machine can hold."""
    if model.get("family", "mot") != "mot":
        return sum(3 * model["layers"][c] * model["mlp_width"][c] for c in choices.COMPONENTS)
    h, layers = model["hidden_size"], model["num_hidden_layers"]
    kv_width = h * model["num_key_value_heads"] // max(1, model["num_attention_heads"])
    widths = (model["intermediate_size"], model.get("gen_intermediate_size", model["intermediate_size"]))
    return layers * sum(2 * h * h + 2 * h * kv_width + 3 * h * w for w in widths) + model.get("vit_hidden_size", 0) * h


def _check_model_size(model: dict) -> None:
    """Refuse a model no machine could hold (``MAX_PARAMETERS``), naming its largest size."""
    n = estimate_parameters(model)
    if n <= MAX_PARAMETERS:
        return
    sizes = {k: v for k, v in model.items() if isinstance(v, int)}
    sizes.update({f"{k}.{c}": v for k in ("layers", "mlp_width") for c, v in model.get(k, {}).items()})
    key = max(sizes, key=sizes.get)
    raise ConfigError(
        f"model.{key}: {sizes[key]} makes a model of at least {n:.2g} parameters, more than the "
        f"{MAX_PARAMETERS:.0e} any machine this pipeline runs on can hold "
        "(unisparse.config_checks.MAX_PARAMETERS)"
    )


def _check_model(model: dict) -> None:
    from .worlds.scenes import CANVAS  # the embedded default's image size (tasks.model_config_kwargs)

    geometry = {**GEOMETRY_DEFAULTS, **{k: v for k, v in model.items() if k in GEOMETRY_DEFAULTS}}
    try:
        check_model_sizes(
            model["num_hidden_layers"], model["num_attention_heads"], model["num_key_value_heads"], CANVAS, **geometry
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def component_sizes(model: dict) -> dict:
    """``{component: (layers, MLP width)}`` the grids are planned with: a MoT's one layer count (and
    its towers' widths), or another family's per-component ``layers`` and ``mlp_width``."""
    if model.get("family", "mot") == "mot":
        widths = {
            "und": model["intermediate_size"],
            "gen": model.get("gen_intermediate_size", model["intermediate_size"]),
        }
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
                    raise ConfigError(
                        f"depth.sweeps[{i}].drop: cannot drop {drop} sublayers of a {component} component "
                        f"with {_layers_key(config['model'], component)}={layers} "
                        f"(granularity {sweep['granularity']})"
                    )


def calibration_reaches(component: str, task: str) -> bool:
    """The generation tower computes nothing on the understanding task: no statistics to rank it."""
    return not (component == "gen" and task == "und")


def _check_moe(config: dict, sizes: dict) -> None:
    moe = config.get("moe")
    if not moe:
        return
    component, task = moe.get("component", "gen"), moe.get("calib_task", "gen")
    if not calibration_reaches(component, task):
        raise ConfigError(
            f"moe.calib_task: {task!r} gives the {component} component no statistics (the generation "
            f"tower computes nothing on the understanding task); use calib_task: gen"
        )
    layers, width = sizes[component]
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
            raise ConfigError(
                f"moe.partitions[{i}].method: 'cluster' needs co-activation statistics; set "
                "calibrate.coactivation: true"
            )
    dense = moe.get("dense_layers", "first_last")
    try:
        converted = moe_layers(layers, dense)
    except ValueError as e:
        raise ConfigError(f"moe.dense_layers: {e}") from None
    if moe["partitions"] and not converted:
        raise ConfigError(
            f"moe.dense_layers: {dense!r} keeps every one of the {layers} layers dense; nothing to convert"
        )
    for tuning in moe["tunings"]:
        if tuning != "none" and tuning not in moe.get("tune", {}):
            raise ConfigError(
                f"moe.tune.{tuning}: missing, but moe.tunings lists {tuning!r} (give its settings, "
                f"e.g. `{tuning}: {{steps: 100}}`)"
            )
    if moe.get("controls") and "full" not in moe.get("tune", {}):
        raise ConfigError(
            f"moe.tune.full: missing, but moe.controls lists {moe['controls']} (the controls get the "
            "MoE's full tuning; give its settings, e.g. `full: {steps: 100}`)"
        )
    if "full" in moe["tunings"] and moe.get("full_init", "frozen") == "frozen" and "frozen" not in moe["tunings"]:
        raise ConfigError(
            "moe.full_init: 'frozen' (full tuning starts from the router-tuned model) needs 'frozen' in moe.tunings"
        )
    _check_tune_data(config)


def _check_tune_data(config: dict) -> None:
    """A real checkpoint never tunes on the shapes world (16-pixel toy shapes through a real tokenizer
    would "tune" it into nonsense), and a prepared source says where its raw files are."""
    moe = config.get("moe") or {}
    tunes = any(t != "none" for t in moe.get("tunings", [])) or bool(moe.get("controls"))
    data = (moe.get("tune") or {}).get("data") or {"source": "shapes"}
    source = config.get("checkpoint", {}).get("source", "train")
    if tunes and source != "train" and data.get("source", "shapes") == "shapes":
        raise ConfigError(
            f"moe.tune.data.source: 'shapes' (the embedded toy world) cannot tune a {source} checkpoint; "
            f"name real data: {', '.join(choices.TUNE_DATA_SOURCES[1:])} (docs/tuning-data.md)"
        )
    if data.get("source", "shapes") != "shapes" and not any(data.get(k) for k in ("path", "lock")):
        raise ConfigError(f"moe.tune.data: source {data['source']!r} needs a path or a lock of its raw files")


def _check_train(config: dict) -> None:
    weights = config.get("train", {}).get("qa_weights")
    if weights is not None and len(weights) != len(choices.QA_TYPES):
        raise ConfigError(
            f"train.qa_weights: needs one weight per ShapesQA type {list(choices.QA_TYPES)}, got {len(weights)}"
        )


def _check_sweep_paths(config: dict) -> None:
    """Every width sweep's keep_ratio spelled in its output path (``keep{keep_ratio}``) as the
    wildcard matches and parses back to the same value: ``1e-05`` would name a path no rule makes."""
    for i, sweep in enumerate(config.get("width", {}).get("sweeps", [])):
        for value in _as_list(sweep["keep_ratio"]):
            spelled = f"{value}"
            if not re.fullmatch(KEEP_RATIO_WILDCARD, spelled) or float(spelled) != value:
                raise ConfigError(
                    f"width.sweeps[{i}].keep_ratio: {value!r} is spelled 'keep{spelled}' in its output "
                    f"path, which the wildcard {KEEP_RATIO_WILDCARD} cannot match or read back; use a "
                    "plain decimal (at least 0.0001)"
                )


def trains(config: dict) -> list[str]:
    """The config settings that make the pipeline train or tune a model (empty: inference only)."""
    out = ["checkpoint.source: train"] if config.get("checkpoint", {}).get("source", "train") == "train" else []
    moe = config.get("moe") or {}
    tunings = [t for t in moe.get("tunings", []) if t != "none"]
    out += [f"moe.tunings: {tunings}"] if tunings and moe.get("partitions") else []
    out += [f"moe.controls: {moe['controls']}"] if moe.get("controls") else []
    return out


def _check_runtime(config: dict) -> None:
    """runtime.dtype is every job's parameter dtype: refuse one that cannot train if any job trains."""
    dtype = config.get("runtime", {}).get("dtype", "float32")
    training = trains(config)
    if dtype in UNTRAINABLE_DTYPES and training:
        raise ConfigError(
            f"runtime.dtype: {dtype} cannot train (AdamW's eps and second moments underflow and the "
            f"weights become NaN), and this config trains ({'; '.join(training)}); use bfloat16 "
            "or float32"
        )


def _check_tuning_memory(config: dict) -> None:
    """The tuning jobs' memory plan against the GPUs ``resources.tune`` asks for (``memplan``)."""
    if not (config.get("moe") or {}).get("partitions") and not (config.get("moe") or {}).get("controls"):
        return
    from .memplan import check_config as check_memory

    try:
        check_memory(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_nodes(config: dict) -> None:
    """``nodes`` > 1 only on the kinds that run one process per GPU (``choices.MULTI_PROCESS_KINDS``)."""
    for kind, values in (config.get("resources") or {}).items():
        nodes = (values or {}).get("nodes", 1)
        if nodes > 1 and kind not in choices.MULTI_PROCESS_KINDS:
            raise ConfigError(
                f"resources.{kind}.nodes: {nodes} nodes, but only the {' and '.join(choices.MULTI_PROCESS_KINDS)} "
                "kinds run over several processes (the others run one process on one GPU)"
            )


def check_config(config: dict) -> None:
    """Raise ``ConfigError`` naming the key for anything that would fail only inside a job."""
    for key in PATH_ROOTS:
        check_path_setting(key, config.get(key, PATH_ROOTS[key]))
    _check_runtime(config)
    _check_train(config)
    _check_model_size(config["model"])
    if config["model"].get("family", "mot") == "mot":
        _check_model(config["model"])
        for stage in ("evaluate", "calibrate"):  # QwenImagePipeline's own rescale exists in that family only
            if config.get(stage, {}).get("cfg_renorm") == "pipeline":
                raise ConfigError(
                    f"{stage}.cfg_renorm: 'pipeline' is the Qwen-Image family's guidance rescale; "
                    f"a MoT takes {list(choices.MOT_RENORMS)}"
                )
    sizes = component_sizes(config["model"])
    _check_depth(config, sizes)
    _check_sweep_paths(config)
    _check_moe(config, sizes)
    _check_nodes(config)
    _check_tuning_memory(config)
