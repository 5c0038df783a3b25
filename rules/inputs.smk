# Outside inputs read from the Hugging Face cache (`hub.inputs`: role -> lock under data/): each is
# downloaded once by a local rule (compute nodes are often offline; retried, as downloads fail
# transiently) that verifies it in the cache and writes a small manifest. Every job that reads an
# input takes its manifest as input; every job but the downloads runs with HF_HUB_OFFLINE=1 (set here,
# not by the user) and reads the commit the lock pins (unisparse.hub_inputs).
import shlex

from unisparse.hub import read_lock
from unisparse.hub_inputs import calibration_roles, evaluation_roles, locked_sections

HUB = config.get("hub") or {}
try:
    HUB_LOCKS = {role: read_lock(path, complete=False) for role, path in (HUB.get("inputs") or {}).items()}
    LOCKED = locked_sections(config, HUB_LOCKS)
except (OSError, ValueError) as e:
    raise WorkflowError(f"invalid config: hub.inputs: {e}") from None
#: the evaluation and calibration settings as the jobs get them: the locked ids and commits filled in
EVAL = LOCKED["evaluate"]
CALIB = LOCKED["calibrate"]

# Every job offline; the downloads run with the user's own HF_HUB_OFFLINE (saved here), so that a
# download from a pre-filled cache (HF_HUB_OFFLINE=1 on the login node) still works. The cache is the
# config's, the same on the login node and the compute nodes. (Snakemake formats the prefix: {{ }}.)
shell.prefix(
    'set -euo pipefail; export UNISPARSE_HF_HUB_OFFLINE="${{HF_HUB_OFFLINE:-}}"; export HF_HUB_OFFLINE=1; '
    + (f"export HF_HUB_CACHE={shlex.quote(HUB['cache'])}; ".replace("{", "{{").replace("}", "}}") if HUB.get("cache") else "")
)


def input_manifest(role):
    return f"{R}/inputs/{role}.json"


def evaluation_inputs():
    """The manifests of the locked inputs the evaluation reads (named `input_<role>`)."""
    roles = evaluation_roles(check_benchmarks(EVAL.get("benchmarks"), implemented_only=False))
    return {f"input_{r}": input_manifest(r) for r in roles if r in HUB_LOCKS}


def calibration_inputs(task):
    """The manifests of the locked inputs the calibration of `task` reads."""
    return {f"input_{r}": input_manifest(r) for r in calibration_roles(CALIB, task) if r in HUB_LOCKS}


if HUB_LOCKS:

    localrules:
        download_input,

    rule download_input:
        input:
            lock=lambda w: HUB["inputs"][w.role],
        output:
            input_manifest("{role}"),
        wildcard_constraints:
            role=one_of(HUB_LOCKS),
        retries: 2
        threads: res("download", "threads")
        resources:
            **resources_for("download"),
        log:
            f"{LOGS}/download_input/{{role}}.log",
        conda:
            "../environment.yml"
        # the user's own HF_HUB_OFFLINE, not the jobs' 1
        shell:
            'HF_HUB_OFFLINE="$UNISPARSE_HF_HUB_OFFLINE" unisparse --no-progress fetch-input --lock {input.lock:q} --out {output:q} 2> {log:q}'
