# Helpers shared by all rule files: config validation, paths, resources, CLI invocation.
import json
import shlex
import sys

from snakemake.utils import validate

validate(config, "../workflow/schemas/config.schema.yaml")

R = config.get("results_dir", "results")
LOGS = config.get("logs_dir", "logs")
# the interpreter running Snakemake also runs the library, so rules work without an activated venv
UNISPARSE = f"{shlex.quote(sys.executable)} -m unisparse --no-progress"


def spec(value):
    """A config section as one shell-quoted JSON argument (params change -> job reruns)."""
    return shlex.quote(json.dumps(value, sort_keys=True))


def res(kind, key):
    """Resource `key` of rule kind `kind`, falling back to resources.default."""
    resources = config["resources"]
    return resources.get(kind, {}).get(key, resources["default"][key])


def all_targets():
    return [f"{R}/metrics/dense.json"]
