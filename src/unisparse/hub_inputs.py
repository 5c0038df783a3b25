"""The outside inputs a study reads from the Hugging Face cache (GenEval's detector and CLIP, MME,
the understanding calibration set), each pinned by a lock: which settings a lock pins, and which
jobs read which input.

A config names them under ``hub.inputs`` (role -> lock file). The lock is the one source of truth:
the repository id and commit it pins become the evaluation and calibration settings the jobs get
(a setting that names another repository or commit is refused), and the download rule's verified
manifest is an input of every job that reads it, so that job runs offline on exactly those bytes.
Pure Python: the workflow imports it when it builds the DAG.
"""

from __future__ import annotations

import copy

from .choices import HUB_INPUT_ROLES
from .config_checks import ConfigError

#: each role (choices.HUB_INPUT_ROLES): the (section, id setting, revision setting) pairs it pins
ROLES = {
    "detector": (("evaluate", "detector", "detector_revision"),),
    "clip": (("evaluate", "clip", "clip_revision"),),
    "mme": (("evaluate", "mme_dataset", "mme_revision"), ("calibrate", "mme_dataset", "mme_revision")),
    "calib": (("calibrate", "calib_dataset", "calib_revision"),),
}
assert tuple(ROLES) == HUB_INPUT_ROLES
#: the roles each real benchmark reads (the shapes benchmarks read none)
BENCHMARK_INPUTS = {"geneval": ("detector", "clip"), "mme": ("mme",)}


def locked_sections(config: dict, locks: dict) -> dict:
    """``{"evaluate": ..., "calibrate": ...}``: copies of those config sections with each locked
    role's repository id and commit filled in (``locks``: role -> the lock read by
    ``unisparse.hub.read_lock``). A setting that already names another repository or commit is a
    ``ConfigError`` naming both: the lock decides, and silently preferring one would evaluate on
    data nobody asked for."""
    sections = {name: copy.deepcopy(config.get(name) or {}) for name in ("evaluate", "calibrate")}
    unknown = sorted(set(locks) - set(ROLES))
    if unknown:
        raise ConfigError(f"hub.inputs: unknown role(s) {', '.join(unknown)} (known: {', '.join(ROLES)})")
    for role, lock in sorted(locks.items()):
        for section, id_key, revision_key in ROLES[role]:
            values = sections[section]
            for key, locked in ((id_key, lock["repo_id"]), (revision_key, lock["revision"])):
                if values.get(key) not in (None, locked):
                    raise ConfigError(
                        f"{section}.{key}: {values[key]!r}, but hub.inputs.{role} locks {locked!r}; "
                        f"leave {section}.{key} out (the lock decides)"
                    )
                values[key] = locked
    return sections


def evaluation_roles(benchmarks: dict) -> list[str]:
    """The roles an evaluation with ``benchmarks`` ({"gen": name, "und": name}) reads."""
    return sorted({role for name in benchmarks.values() for role in BENCHMARK_INPUTS.get(name, ())})


def calibration_roles(calibrate: dict, task: str) -> list[str]:
    """The roles the calibration pass of ``task`` reads: on MME's side (``benchmarks.und: mme``) the
    understanding set and MME itself (whose images it excludes); the generation task calibrates on
    prompts shipped in the package."""
    if task != "und" or (calibrate.get("benchmarks") or {}).get("und") != "mme":
        return []
    return ["calib", "mme"]
