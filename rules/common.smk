# Helpers shared by the workflow (config validation, paths, grids, resources).
import json
import os
import re

from snakemake.exceptions import WorkflowError

import unisparse.runtime as unisparse_runtime  # pure Python: no torch at import
from unisparse import choices  # every allowed value, defined once (pure Python)
from unisparse.benchmarks import check_benchmarks  # pure Python
from unisparse.codemap import code_identity, identity_file_name, write_code_identity
from unisparse.config_checks import (
    KEEP_RATIO_WILDCARD,
    ConfigError,
    calibration_reaches,
    check_config,
    check_config_file,
    check_path_setting,
    validate_config,
)

try:
    # Snakemake's loader keeps the last of a key given twice: read each config file again, strictly
    for configfile_path in workflow.configfiles:
        check_config_file(configfile_path)
    # the schema with its `{choices: NAME}` and `range:` filled from unisparse.choices and unisparse.ranges;
    # fills in the schema's defaults
    validate_config(config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"))
    check_config(config)  # what the schema cannot say: values checked against each other
except ConfigError as e:
    raise WorkflowError(f"invalid config: {e}") from None


def one_of(*values):
    """A wildcard constraint matching exactly one of the given values (tuples of unisparse.choices,
    or extra values): one_of(choices.TASKS, ["none"]) -> und|gen|none."""
    return "|".join(re.escape(v) for group in values for v in group)


R = check_path_setting("results_dir", config.get("results_dir", "results"))
LOGS = check_path_setting("logs_dir", config.get("logs_dir", "logs"))


def runtime_settings(section):
    """`runtime:` with the library's defaults, checked against the library's own values
    (unisparse.runtime), so the workflow never accepts a device or dtype the CLI refuses."""
    settings = {**unisparse_runtime.DEFAULTS, **(section or {})}
    try:
        unisparse_runtime.check_device(settings["device"])  # the whole string (no trailing newline)
    except ValueError as e:
        raise WorkflowError(f"invalid config: runtime.device: {e}") from None
    if settings["dtype"] not in unisparse_runtime.DTYPES:
        raise WorkflowError(f"invalid config: runtime.dtype: must be one of {', '.join(unisparse_runtime.DTYPES)}, "
                            f"got {settings['dtype']!r}")
    threads = settings.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise WorkflowError(f"invalid config: runtime.threads: must be a positive integer, got {threads!r}")
    return settings


RUNTIME = runtime_settings(config.get("runtime"))
# how derived models are written: full copies, or deltas of their parent (unisparse.deltas)
MODEL_STORE = config.get("model_store", "full")


def spec(value):
    """A config section as one JSON argument (params change -> job reruns). Rules quote it (`:q`):
    every value that reaches a shell is quoted there, never pasted in."""
    return json.dumps(value, sort_keys=True)


PKG = "src/unisparse"
#: each verb's code identity (unisparse.codemap): inside results_dir, so that DVC records it with the
#: artifacts that code made (a fresh clone's fetch then sees them up to date)
CODE_DIR = f"{R}/.code"


def code_config():
    """The configured family and benchmarks (evaluation's and calibration's): the code a job runs."""
    benchmarks = set()
    for section in ("evaluate", "calibrate"):
        chosen = check_benchmarks((config.get(section) or {}).get("benchmarks"), implemented_only=False)
        benchmarks |= set(chosen.values())
    return (config.get("model") or {}).get("family", "mot"), tuple(sorted(benchmarks))


CODE_CONFIG = code_config()
#: the verbs with a code input, and whether their digest files are written (write_code_inputs)
CODE_INPUTS = {"verbs": [], "written": False}


def code(verb):
    """The code input of a `unisparse <verb>` job: a file holding the digest of what that verb runs for
    the configured family and benchmarks (unisparse.codemap.code_identity: definitions, not files;
    meaning, not text), rewritten only when the digest changes. So an edit that changes no code a job
    runs (a comment, a docstring, formatting, another family's or benchmark's module) reruns nothing;
    one that does reruns exactly the jobs whose verb runs it. Computed here (an error is one line at
    parse time); written by write_code_inputs."""
    try:
        code_identity(verb, PKG, *CODE_CONFIG)
    except (KeyError, OSError, SyntaxError, ValueError) as e:
        raise WorkflowError(f"code({verb!r}): {e}") from None
    CODE_INPUTS["verbs"].append(verb)
    if CODE_INPUTS["written"]:  # a rule read after `rule all`
        write_code_inputs()
    return f"{CODE_DIR}/{identity_file_name(verb, *CODE_CONFIG)}"


def write_code_inputs():
    """Write the digest files of the code inputs: when the Snakefile's `rule all` is read (all_targets),
    after every rule file, so that a config refused while the rules are read leaves no file behind,
    and before the DAG is built (Snakemake takes a file written later for a missing input)."""
    for verb in dict.fromkeys(CODE_INPUTS["verbs"]):
        try:
            write_code_identity(verb, CODE_DIR, PKG, *CODE_CONFIG)
        except OSError as e:
            raise WorkflowError(f"code({verb!r}): cannot write its digest file: {e}") from None
    CODE_INPUTS["written"] = True


def product(sweep, keys):
    """Cartesian product of the list-valued keys of one sweep entry, as dicts."""
    import itertools

    lists = [sweep[k] if isinstance(sweep[k], list) else [sweep[k]] for k in keys]
    return [dict(zip(keys, values)) for values in itertools.product(*lists)]


DEPTH_KEYS = ["component", "calib_task", "granularity", "score", "kv", "mode", "drop"]
DEPTH_PATH = "depth/{component}/cal-{calib_task}/{granularity}-{score}-kv{kv}-{mode}/drop{drop}"
WIDTH_KEYS = ["component", "calib_task", "score", "keep_ratio"]
WIDTH_PATH = "width/{component}/cal-{calib_task}/{score}/keep{keep_ratio}"


def depth_variants():
    out = {}
    for sweep in config.get("depth", {}).get("sweeps", []):
        for v in product(sweep, DEPTH_KEYS):
            if calibration_reaches(v["component"], v["calib_task"]):
                out[DEPTH_PATH.format(**v)] = v
    return out


def width_variants():
    out = {}
    for sweep in config.get("width", {}).get("sweeps", []):
        for v in product(sweep, WIDTH_KEYS):
            if v["score"] in choices.DATA_FREE_WIDTH_SCORES:
                v["calib_task"] = "none"
            elif not calibration_reaches(v["component"], v["calib_task"]):
                continue
            out[WIDTH_PATH.format(**v)] = v
    return out


MOE = config.get("moe", {})
MOE_KEYS = ["component", "num_experts", "top_k", "method", "router", "shared_size"]
MOE_PATH = "moe/{component}/E{num_experts}-k{top_k}-{method}-{router}-s{shared_size}"
MOE_CONSTRAINTS = {
    "component": one_of(choices.COMPONENTS),
    "num_experts": r"\d+",
    "top_k": r"\d+",
    "method": one_of(choices.PARTITION_METHODS),
    "router": one_of(choices.ROUTERS),
    "shared_size": r"\d+",
}


def moe_variants():
    out = {}
    for part in MOE.get("partitions", []):
        v = {"component": MOE["component"], "shared_size": 0, "method": "snake", "router": "paper", **part}
        out[MOE_PATH.format(**v)] = v  # sizes checked by check_config
    return out


def moe_metrics():
    return [f"{R}/metrics/{p}/{t}.json" for p in moe_variants() for t in MOE.get("tunings", [])]


def moe_meta(w, tuning):
    v = {k: w[k] for k in MOE_KEYS}
    for k in ("num_experts", "top_k", "shared_size"):
        v[k] = int(v[k])
    return {"stage": "moe", "variant_id": f"{MOE_PATH.format(**w)}/{tuning}", "tuning": tuning, **v}


def moe_dense_layers():
    dense = MOE.get("dense_layers", "first_last")
    return dense if isinstance(dense, str) else ",".join(map(str, dense)) or "none"


def moe_tuning_input(w):
    """frozen starts from the untuned partition; full from `moe.full_init` (the paper: frozen first)."""
    previous = "none" if w.tuning == "frozen" else MOE.get("full_init", "frozen")
    return f"{R}/models/{MOE_PATH.format(**w)}/{previous}"


def control_sources():
    """Models given the MoE's full tuning as controls (`moe.controls`): the dense model and, per
    distinct active fraction k/E, the act_norm width cut of the MoE component at that fraction."""
    controls = MOE.get("controls", [])
    out = ["dense"] if "dense" in controls else []
    if "static" in controls:
        for v in moe_variants().values():
            keep = int(v["top_k"]) / int(v["num_experts"])
            path = WIDTH_PATH.format(component=MOE["component"], calib_task=MOE.get("calib_task", "gen"),
                                     score="act_norm", keep_ratio=f"{keep:g}")
            out += [path] if path not in out else []
    return out


STATIC_CONTROL = WIDTH_PATH.format(component=f"(?:{one_of(choices.COMPONENTS)})", calib_task=f"(?:{one_of(choices.TASKS)})",
                                   score=f"(?:{one_of(choices.WIDTH_SCORES)})", keep_ratio=KEEP_RATIO_WILDCARD)
CONTROL_SOURCE = f"dense|{STATIC_CONTROL}"


def control_meta(source):
    """Table coordinates of a tuned control: its source's (width cut or dense) plus the tuning."""
    v = {"component": MOE["component"]}
    if source != "dense":
        _, component, cal, score, keep = source.split("/")
        v = dict(component=component, calib_task=cal[len("cal-"):], score=score, keep_ratio=float(keep[len("keep"):]))
    return {"stage": "tuned", "variant_id": f"tuned/{source}", "source": stage_of(source), "tuning": "full", **v}


def control_metrics():
    return [f"{R}/metrics/tuned/{s}.json" for s in control_sources()]


def moe_table_inputs():
    """Dense, every MoE variant, static width cuts of the MoE component and the tuned controls."""
    static = [f"{R}/metrics/{p}.json" for p, v in width_variants().items() if v["component"] == MOE.get("component")]
    static += [f"{R}/metrics/{p}.json" for p in control_sources() if p != "dense" and p not in width_variants()]
    return [f"{R}/metrics/dense.json"] + moe_metrics() + static + control_metrics()


def probe_metrics():
    return [f"{R}/metrics/dense.json"] + [f"{R}/metrics/{p}.json" for p in [*depth_variants(), *width_variants()]]


def all_targets():
    write_code_inputs()  # `rule all` is read last: every rule (and its code input) is known
    targets = [f"{R}/metrics/dense.json"]
    if depth_variants() or width_variants():
        targets.append(f"{R}/tables/probes.csv")
    if moe_metrics():
        targets.append(f"{R}/tables/moe.csv")
    targets += figure_targets()
    return targets


def stage_of(variant):
    return variant.split("/", 1)[0]


def width_calibration(w):
    """Data-free width scores need no calibration file."""
    return [] if w.calib_task == "none" else [f"{R}/calibration/{w.calib_task}.safetensors"]
