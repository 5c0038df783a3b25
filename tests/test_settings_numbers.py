"""One rule for numbers (issue 20, items 1, 3, 5-9): nothing non-finite passes, every stage setting has
the same range in the CLI (``spec.merge_spec``) as in the config schema (both read
``unisparse.ranges``), path and name patterns match whole strings, sweep values round-trip through
their output paths, duplicate keys are refused, and what fails only inside a job is refused when
Snakemake builds the DAG, naming the key.

Cheap: the config checks are called directly; a few `snakemake -n` dry runs of a workflow copy show
that rules/common.smk applies them.
"""

import copy
import math

import pytest
import yaml

from helpers.workflow import MICRO, REPO, copy_workflow, snakemake, write_config
from unisparse import ranges
from unisparse.calibrate import CALIB_DEFAULTS
from unisparse.config_checks import (
    ConfigError,
    check_config,
    check_config_file,
    config_schema,
    validate_config,
)
from unisparse.evaluate.runner import EVAL_DEFAULTS
from unisparse.moe.tune import TUNE_DEFAULTS
from unisparse.spec import merge_spec
from unisparse.train import TRAIN_DEFAULTS
from unisparse.tunedata.contamination import CONTAMINATION_DEFAULTS
from unisparse.tunedata.prepare import PREPARE_DEFAULTS

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
#: settings kind -> (the stage's defaults, where the config holds them)
KINDS = {
    "training": (TRAIN_DEFAULTS, ("train",)),
    "tuning": (TUNE_DEFAULTS, ("moe", "tune", "full")),
    "evaluation": (EVAL_DEFAULTS, ("evaluate",)),
    "calibration": (CALIB_DEFAULTS, ("calibrate",)),
    "tune_data": (PREPARE_DEFAULTS, ("moe", "tune", "data")),
    "tune_data_contamination": (CONTAMINATION_DEFAULTS, ("moe", "tune", "data", "contamination")),
}


def micro():
    return yaml.safe_load((REPO / MICRO).read_text())


def checked(config):
    """validate_config then check_config, as rules/common.smk runs them; the ConfigError's message or None."""
    try:
        validate_config(config, SCHEMA)
        check_config(config)
    except ConfigError as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    return None


def edited(edit):
    config = micro()
    edit(config)
    return checked(config)


def section(config, where):
    """The mapping at ``where`` (made empty where the config does not have it: ``moe.tune.data``)."""
    for key in where:
        config = config.setdefault(key, {})
    return config


def schema_node(schema, kind):
    """The schema node of a settings kind's section (``tune`` and ``tune_data`` are shared definitions)."""
    defs = {"tuning": ("tune",), "tune_data": ("tune_data",), "tune_data_contamination": ("tune_data", "contamination")}
    if kind not in defs:
        return schema["properties"][KINDS[kind][1][0]]
    node = schema["$defs"][defs[kind][0]]
    for key in defs[kind][1:]:
        node = node["properties"][key]
    return node


# --- the ranges are defined once: ranges.py, the schema and the stages' defaults agree ----------------


def range_nodes(node, found):
    """{name: node} of every `range: NAME` in a raw schema."""
    if isinstance(node, dict):
        if isinstance(node.get("range"), str):
            found.setdefault(node["range"], []).append(node)
        for v in node.values():
            range_nodes(v, found)
    elif isinstance(node, list):
        for v in node:
            range_nodes(v, found)
    return found


def test_every_range_is_in_the_schema_and_nothing_else_is():
    """No drift: the schema names every range of unisparse.ranges, no other, and writes no bound of a
    stage setting itself; the filled schema holds exactly ranges.py's bounds."""
    raw = yaml.safe_load(SCHEMA.read_text())
    named = range_nodes(raw, {})
    assert set(named) == {f"{kind}.{key}" for kind, keys in ranges.RANGES.items() for key in keys}
    for name, nodes in named.items():
        for node in nodes:
            assert not {"minimum", "exclusiveMinimum", "maximum"} & set(node), name
    filled = config_schema(SCHEMA)
    props = filled["properties"]
    assert props["train"]["properties"]["lr"] == {"type": "number", **ranges.bounds("training.lr")}
    assert props["evaluate"]["properties"]["qa_items"]["maximum"] == ranges.MAX_QA_ITEMS
    assert props["evaluate"]["properties"]["cfg_interval"]["items"] == ranges.bounds("evaluation.cfg_interval")
    assert filled["$defs"]["tune"]["properties"]["warmup_frac"] == {"type": "number", "minimum": 0, "maximum": 1}
    assert range_nodes(filled, {}) == {}  # none left unfilled


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_numeric_stage_setting_has_a_range_and_its_default_lies_in_it(kind):
    defaults, where = KINDS[kind]
    numeric = {k for k, v in defaults.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool)}
    assert numeric <= set(ranges.RANGES[kind]), "a numeric setting without a range"
    assert set(ranges.RANGES[kind]) <= set(defaults), "a range for a setting the stage does not have"
    merge_spec(defaults, {}, kind)  # the defaults themselves pass
    schema = config_schema(SCHEMA)
    node = schema_node(schema, kind)
    assert set(ranges.RANGES[kind]) <= set(node["properties"]), "a range the config section does not have"


def probes(b: dict, integer: bool):
    """(refused, accepted) values at the edges of bounds ``b``."""
    step = 1 if integer else 1e-9
    out, ok = [], []
    if "minimum" in b:
        out.append(b["minimum"] - step)
        ok.append(b["minimum"])
    if "exclusiveMinimum" in b:
        out.append(b["exclusiveMinimum"])
        ok.append(b["exclusiveMinimum"] + step)
    if "maximum" in b:
        out.append(b["maximum"] + step)
        ok.append(b["maximum"])
    return out, ok


CASES = [(kind, key) for kind, keys in sorted(ranges.RANGES.items()) for key in sorted(keys)]


@pytest.mark.parametrize("kind,key", CASES, ids=[f"{k}.{s}" for k, s in CASES])
def test_the_cli_and_the_schema_refuse_and_accept_the_same_values(kind, key):
    """At each edge of each range: the verb's settings check and the config check agree."""
    defaults, where = KINDS[kind]
    integer = isinstance(defaults[key], int) or key == "mme_max_images_per_subtask"
    refused, accepted = probes(ranges.RANGES[kind][key], integer)
    for value, expect_refused in [(v, True) for v in refused] + [(v, False) for v in accepted]:
        if key == "cfg_interval":
            value = [value, 1.0] if value <= 1 else [0.0, value]
        elif key == "qa_weights":
            value = [value, 1, 1, 1]
        try:
            merge_spec(defaults, {key: value}, kind)
            cli_refused = False
        except ValueError as e:
            cli_refused = True
            assert key in str(e)
        config = micro()
        section(config, where)[key] = value
        message = checked(config)
        assert (message is not None) == cli_refused == expect_refused, (value, message)
        if expect_refused:
            assert ".".join(where) + f".{key}" in message, message


# --- items 3 and 6: nothing non-finite, anywhere ----------------------------------------------------


NON_FINITE = {
    "evaluate.cfg_scale": (lambda c: c["evaluate"].__setitem__("cfg_scale", math.inf), "evaluate.cfg_scale"),
    "evaluate.cfg_interval[1]": (
        lambda c: c["evaluate"].__setitem__("cfg_interval", [0.0, math.nan]),
        "evaluate.cfg_interval[1]",
    ),
    "model.timestep_shift": (lambda c: c["model"].__setitem__("timestep_shift", math.inf), "model.timestep_shift"),
    "train.lr nan": (lambda c: c["train"].__setitem__("lr", math.nan), "train.lr"),
    "train.lr inf": (lambda c: c["train"].__setitem__("lr", math.inf), "train.lr"),
    "train.warmup_frac": (lambda c: c["train"].__setitem__("warmup_frac", math.nan), "train.warmup_frac"),
    "train.qa_weights[2]": (lambda c: c["train"].__setitem__("qa_weights", [1, 1, math.inf, 1]), "train.qa_weights[2]"),
    "moe.tune.full.lr": (lambda c: c["moe"]["tune"]["full"].__setitem__("lr", math.inf), "moe.tune.full.lr"),
    "keep_ratio nan": (
        lambda c: c["width"]["sweeps"][0].__setitem__("keep_ratio", [math.nan]),
        "width.sweeps[0].keep_ratio[0]",
    ),
    "resources": (lambda c: c["resources"]["default"].__setitem__("mem_mb", -math.inf), "resources.default.mem_mb"),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_a_non_finite_number_is_refused_anywhere_in_the_config(case):
    edit, key = NON_FINITE[case]
    message = edited(edit)
    assert message is not None and message.startswith(f"{key}:") and "finite" in message, message


@pytest.mark.parametrize(
    "text", ['{"cfg_scale": Infinity}', '{"cfg_interval": [0.0, NaN]}', '{"cfg_scale": -Infinity}']
)
def test_a_non_finite_number_is_refused_in_a_verbs_settings(text):
    import json

    spec = json.loads(text)
    with pytest.raises(ValueError, match=r"cfg_(scale|interval\[1\])=.*not a finite number"):
        merge_spec(EVAL_DEFAULTS, spec, "evaluation")


def test_list_settings_are_checked_item_by_item():
    with pytest.raises(ValueError, match="cfg_interval"):
        merge_spec(EVAL_DEFAULTS, {"cfg_interval": [0.0, "1"]}, "evaluation")
    with pytest.raises(ValueError, match="cfg_interval"):
        merge_spec(EVAL_DEFAULTS, {"cfg_interval": [0.5]}, "evaluation")
    with pytest.raises(ValueError, match=r"qa_weights\[1\]=-1: must be >= 0"):
        merge_spec(TRAIN_DEFAULTS, {"qa_weights": [1, -1, 1, 1]}, "training")
    assert merge_spec(EVAL_DEFAULTS, {"max_prompts_per_tag": None}, "evaluation")["max_prompts_per_tag"] is None


# --- item 9: settings that cannot produce work, and a sane maximum ------------------------------------


NO_WORK = [
    ("training", "steps", -3),
    ("training", "steps", 0),
    ("evaluation", "num_steps", 0),
    ("tuning", "warmup_frac", -5),
    ("tuning", "min_lr_frac", 7),
    ("evaluation", "max_prompts_per_tag", 0),
    ("evaluation", "samples_per_prompt", 0),
    ("evaluation", "batch_size", 0),
    ("evaluation", "latency_repeats", 0),
    ("evaluation", "qa_items", 0),
    ("calibration", "qa_items", 0),
    ("calibration", "calib_items", 0),
    ("calibration", "samples_per_prompt", 0),
    ("evaluation", "qa_items", 10**12),
    ("calibration", "coactivation_dim", 10**12),
]


@pytest.mark.parametrize("kind,key,value", NO_WORK, ids=[f"{k}.{s}={v}" for k, s, v in NO_WORK])
def test_settings_that_cannot_produce_work_are_refused(kind, key, value):
    defaults, where = KINDS[kind]
    with pytest.raises(ValueError, match=rf"{kind} setting {key}={value}: must be"):
        merge_spec(defaults, {key: value}, kind)
    config = micro()
    section(config, where)[key] = value
    assert checked(config).startswith(".".join(where) + f".{key}:")


# --- item 5: whole-string patterns ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("results_dir", "results/x\n"),
        ("logs_dir", "logs/x\n"),
        ("calibrate.calib_dataset", "lmms-lab/POPE\n"),
        ("evaluate.mme_dataset", "lmms-lab/MME\n"),
        ("runtime.device", "cpu\n"),
    ],
)
def test_a_trailing_newline_fails_the_path_and_pattern_checks(key, value):
    config = micro()
    *parents, leaf = key.split(".")
    target = config
    for p in parents:
        target = target.setdefault(p, {})
    target[leaf] = value
    message = checked(config)
    assert message is not None and message.startswith(f"{key}:"), message


# --- item 6: refused when the DAG is built, naming the key ---------------------------------------------


def test_an_impossible_model_size_is_refused_naming_the_key():
    message = edited(lambda c: c["model"].__setitem__("hidden_size", 10**12))
    assert message.startswith("model.hidden_size:") and "parameters" in message
    message = edited(lambda c: c["calibrate"].__setitem__("coactivation_dim", 10**12))
    assert message.startswith("calibrate.coactivation_dim:")


def test_a_moe_calibrated_on_a_task_its_component_does_not_run_is_refused():
    message = edited(lambda c: c["moe"].update(calib_task="und", component="gen"))
    assert message.startswith("moe.calib_task:") and "gen" in message
    assert edited(lambda c: c["moe"].update(calib_task="und", component="und")) is None


# --- item 7: sweep values round-trip through their output paths ------------------------------------------


@pytest.mark.parametrize("value", [0.00001, 1e-7])
def test_a_keep_ratio_the_wildcard_cannot_spell_is_refused(value):
    message = edited(lambda c: c["width"]["sweeps"][0].__setitem__("keep_ratio", [0.5, value]))
    assert message.startswith("width.sweeps[0].keep_ratio:") and "keep1e-" in message, message


def test_plain_keep_ratios_pass():
    assert edited(lambda c: c["width"]["sweeps"][0].__setitem__("keep_ratio", [0.0001, 0.3, 1, 0.1 + 0.2])) is None


# --- item 1 (DAG): float16 cannot train --------------------------------------------------------------------


def test_float16_is_refused_where_the_config_trains_or_tunes():
    message = edited(lambda c: c["runtime"].__setitem__("dtype", "float16"))
    assert message.startswith("runtime.dtype:") and "bfloat16" in message and "float32" in message


def test_float16_passes_where_nothing_trains():
    config = micro()
    config["runtime"]["dtype"] = "float16"
    config["checkpoint"] = {"source": "huggingface", "lock": "data/x.lock.json"}
    config["moe"].update(tunings=["none"], controls=[])
    config["moe"].pop("tune")
    config.pop("train")
    assert checked(config) is None


# --- item 8: duplicate keys ---------------------------------------------------------------------------------


def test_a_duplicate_yaml_key_is_refused_naming_key_and_file(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text((REPO / MICRO).read_text().replace("  steps: 40\n", "  steps: 40\n  steps: 4000\n", 1))
    with pytest.raises(ConfigError, match=rf"^steps: duplicate key in {path} \(line \d+, first given on line \d+\)"):
        check_config_file(path)
    (tmp_path / "dup.json").write_text('{"train": {"steps": 40, "steps": 4000}}')
    with pytest.raises(ConfigError, match="steps: duplicate key"):
        check_config_file(tmp_path / "dup.json")
    merged = tmp_path / "anchors.yaml"  # a merge key then an override is not a duplicate
    merged.write_text("base: &b {steps: 1, lr: 0.1}\ntrain:\n  <<: *b\n  steps: 2\n")
    assert check_config_file(merged)["train"] == {"steps": 2, "lr": 0.1}
    assert check_config_file(REPO / MICRO) == micro()


# --- the workflow applies all of it when the DAG is built (dry runs) -----------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("numbers") / "wf")


def dry_run_refuses(workdir, config, named):
    proc = snakemake(workdir, "-n", config=config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "invalid config: " + named in out, out[-3000:]
    assert "MissingInputException" not in out and "KeyError" not in out


@pytest.mark.slow
def test_the_dag_refuses_a_duplicate_key(workdir):
    (workdir / "dup.yaml").write_text(
        (workdir / MICRO).read_text().replace("  steps: 40\n", "  steps: 40\n  steps: 4000\n")
    )
    dry_run_refuses(workdir, "dup.yaml", "steps: duplicate key in")


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit,named",
    [
        (lambda c: c["train"].__setitem__("lr", math.nan), "train.lr:"),
        (lambda c: c["width"]["sweeps"][0].__setitem__("keep_ratio", [0.00001]), "width.sweeps[0].keep_ratio:"),
        (lambda c: c["moe"].__setitem__("calib_task", "und"), "moe.calib_task:"),
        (lambda c: c["runtime"].__setitem__("dtype", "float16"), "runtime.dtype:"),
        (lambda c: c.__setitem__("results_dir", "results/x\n"), "results_dir:"),
    ],
    ids=["nan lr", "keep1e-05", "calib_task und for gen", "float16 training", "newline in results_dir"],
)
def test_the_dag_refuses_before_any_job(workdir, edit, named):
    dry_run_refuses(workdir, write_config(workdir, edit, "edited.yaml"), named)


def test_the_default_configs_still_pass():
    for name in ("micro", "tiny", "paper", "qwen_image"):
        config = yaml.safe_load((REPO / f"workflow/config/{name}.yaml").read_text())
        assert checked(copy.deepcopy(config)) is None, name
        check_config_file(REPO / f"workflow/config/{name}.yaml")
