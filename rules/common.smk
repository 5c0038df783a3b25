# Helpers shared by the workflow (config validation, paths, grids, resources).
import json
import shlex

from snakemake.utils import validate

validate(config, "../workflow/schemas/config.schema.yaml")

R = config.get("results_dir", "results")
LOGS = config.get("logs_dir", "logs")


def spec(value):
    """A config section as one shell-quoted JSON argument (params change -> job reruns)."""
    return shlex.quote(json.dumps(value, sort_keys=True))


def product(sweep, keys):
    """Cartesian product of the list-valued keys of one sweep entry, as dicts."""
    import itertools

    lists = [sweep[k] if isinstance(sweep[k], list) else [sweep[k]] for k in keys]
    return [dict(zip(keys, values)) for values in itertools.product(*lists)]


def calibration_reaches(component, task):
    """The generation tower computes nothing on the understanding task: no statistics to rank it."""
    return not (component == "gen" and task == "und")


DEPTH_KEYS = ["component", "calib_task", "granularity", "score", "kv", "mode", "drop"]
DEPTH_PATH = "depth/{component}/cal-{calib_task}/{granularity}-{score}-kv{kv}-{mode}/drop{drop}"
WIDTH_KEYS = ["component", "calib_task", "score", "keep_ratio"]
WIDTH_PATH = "width/{component}/cal-{calib_task}/{score}/keep{keep_ratio}"
WIDTH_DATA_FREE = ("weight", "random")


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
            if v["score"] in WIDTH_DATA_FREE:
                v["calib_task"] = "none"
            elif not calibration_reaches(v["component"], v["calib_task"]):
                continue
            out[WIDTH_PATH.format(**v)] = v
    return out


def probe_metrics():
    return [f"{R}/metrics/dense.json"] + [f"{R}/metrics/{p}.json" for p in [*depth_variants(), *width_variants()]]


def all_targets():
    targets = [f"{R}/metrics/dense.json"]
    if depth_variants() or width_variants():
        targets.append(f"{R}/tables/probes.csv")
    return targets


def stage_of(variant):
    return variant.split("/", 1)[0]


def width_calibration(w):
    """Data-free width scores need no calibration file."""
    return [] if w.calib_task == "none" else [f"{R}/calibration/{w.calib_task}.safetensors"]
