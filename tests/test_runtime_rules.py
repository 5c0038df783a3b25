"""The config's `runtime:` (device, dtype, threads) as the rules pass it to every `unisparse` verb.

Cheap: dry runs (`snakemake -n -p`) of a copy of the workflow, and one run in which a stand-in for
the `unisparse` command creates the outputs a rule declares (seconds: nothing is trained), so that
Snakemake has a record of every job's params to compare a changed config against.
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from helpers.workflow import MICRO, REPO, copy_workflow, planned_jobs, snakemake, stand_in_cli, write_config
from unisparse import runtime
from unisparse.config_checks import config_schema

pytestmark = pytest.mark.slow  # drives Snakemake in subprocesses: outside the fast inner loop

#: the rules that call a `unisparse` verb other than `aggregate`, and that verb
VERBS = {
    "train_tiny": "train-tiny",
    "calibrate": "calibrate",
    "evaluate": "evaluate",
    "prune_depth": "prune-depth",
    "prune_width": "prune-width",
    "partition": "partition",
    "tune_moe": "tune-moe",
    "tune_control": "tune",
}
TABLES = {"probes_table", "moe_table"}
TARGETS = ["results/tables/probes.csv", "results/tables/moe.csv"]  # everything but the figures (papermill)


def commands(workdir: Path, config: str = MICRO) -> dict:
    """rule -> [shell command as argv] of every job a dry run plans."""
    proc = snakemake(workdir, "-n", "-p", config=config, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {}
    blocks = re.split(r"^(?:local)?rule (\w+):$", proc.stdout, flags=re.M)  # [preamble, rule, body, rule, body, ...]
    for rule, body in zip(blocks[1::2], blocks[2::2]):
        shell = re.search(r"^Shell command: (.*)$", body, re.M)
        if shell and shell[1] != "None":
            jobs.setdefault(rule, []).append(shlex.split(shell[1]))
    return jobs


def options(argv, verb):
    """The runtime options that follow the verb: {'--device': ..., '--dtype': ..., '--threads': ...}."""
    after = argv[argv.index(verb) + 1 :]
    return {k: after[after.index(k) + 1] for k in ("--device", "--dtype", "--threads") if k in after}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("runtime") / "wf")


def test_schema_states_the_library_values():
    """The schema is what users read; the values are defined once in unisparse.runtime."""
    schema = config_schema(REPO / "workflow/schemas/config.schema.yaml")["properties"]["runtime"]
    props = schema["properties"]
    assert props["dtype"]["enum"] == list(runtime.DTYPES)
    assert props["device"]["pattern"] == runtime.DEVICE_PATTERN
    assert {k: props[k]["default"] for k in runtime.DEFAULTS} == runtime.DEFAULTS
    assert schema["additionalProperties"] is False
    for name in ("tiny.yaml", "micro.yaml"):
        assert yaml.safe_load((REPO / "workflow/config" / name).read_text())["runtime"] == runtime.DEFAULTS


def test_every_unisparse_verb_gets_the_default_runtime(workdir):
    jobs = commands(workdir)
    assert set(VERBS) <= set(jobs)
    for rule, verb in VERBS.items():
        for argv in jobs[rule]:
            assert argv[:3] == ["unisparse", "--no-progress", verb], argv[:3]
            assert options(argv, verb) == {"--device": "auto", "--dtype": "float32"}, (rule, argv)
    for rule in TABLES:  # aggregate reads JSON: no device
        assert all("--device" not in argv and "--dtype" not in argv for argv in jobs[rule])
    papermill = [argv for rule, argvs in jobs.items() if rule not in VERBS for argv in argvs if "papermill" in argv]
    assert papermill and all("--device" not in argv for argv in papermill)


def test_runtime_values_reach_every_verb(workdir):
    config = write_config(
        workdir, lambda c: c.__setitem__("runtime", {"device": "cpu", "dtype": "bfloat16", "threads": 3})
    )
    jobs = commands(workdir, config)
    for rule, verb in VERBS.items():
        for argv in jobs[rule]:
            assert options(argv, verb) == {"--device": "cpu", "--dtype": "bfloat16", "--threads": "3"}, (rule, argv)


def test_gpu_kinds_run_on_cuda_and_only_training_verbs_use_several_processes(workdir):
    def edit(c):
        c["resources"].update(evaluate={"gpus": 1}, tune={"gpus": 2}, prune={"gpus": 4}, train={"gpus": 1})
        c["runtime"] = {"dtype": "bfloat16"}

    jobs = commands(workdir, write_config(workdir, edit))
    device = {rule: {options(argv, verb)["--device"] for argv in jobs[rule]} for rule, verb in VERBS.items()}
    assert device == {
        "train_tiny": {"cuda"},
        "calibrate": {"auto"},
        "evaluate": {"cuda"},
        "prune_depth": {"cuda"},
        "prune_width": {"cuda"},
        "partition": {"cuda"},
        "tune_moe": {"cuda"},
        "tune_control": {"cuda"},
    }
    for rule in ("tune_moe", "tune_control"):
        for argv in jobs[rule]:  # 2 GPUs: one process each
            assert argv[:8] == [
                "torchrun",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "unisparse",
                "--no-progress",
                VERBS[rule],
            ], argv[:8]
            assert options(argv, VERBS[rule]) == {"--device": "cuda", "--dtype": "bfloat16"}
    # one GPU (train) or a single-process verb on 4 GPUs (prune kind): plain unisparse
    for rule in ("train_tiny", "prune_depth", "prune_width", "partition", "evaluate", "calibrate"):
        assert all(argv[0] == "unisparse" for argv in jobs[rule]), rule

    two = write_config(workdir, lambda c: c["resources"].update(train={"gpus": 2}), "train2.yaml")
    (argv,) = commands(workdir, two)["train_tiny"]
    assert argv[:8] == [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "unisparse",
        "--no-progress",
        "train-tiny",
    ]

    # an explicit device is used as given, GPUs or not
    explicit = write_config(
        workdir,
        lambda c: (c["resources"].update(evaluate={"gpus": 1}), c.__setitem__("runtime", {"device": "cuda:1"})),
        "explicit.yaml",
    )
    assert {options(argv, "evaluate")["--device"] for argv in commands(workdir, explicit)["evaluate"]} == {"cuda:1"}


BAD = {
    "device gpu": ({"device": "gpu"}, None, ["runtime", "device", "gpu"]),
    "device with a newline": ({"device": "cuda\n"}, None, ["runtime.device"]),
    "dtype int8": ({"dtype": "int8"}, None, ["runtime", "dtype", "int8"]),
    "unknown key": ({"devcie": "cuda"}, None, ["runtime", "devcie"]),
    "zero threads": ({"threads": 0}, None, ["runtime", "threads"]),
    "one GPU named for a multi-process kind": (
        {"device": "cuda:0"},
        {"tune": {"gpus": 2}},
        ["runtime.device", "cuda:0"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_runtime_is_refused_before_any_job(tmp_path, case):
    section, resources, named = BAD[case]
    workdir = copy_workflow(tmp_path / "wf")
    config = write_config(
        workdir, lambda c: (c.__setitem__("runtime", section), c["resources"].update(resources or {}))
    )
    proc = snakemake(workdir, "--cores", "1", config=config, check=False, path_first=stand_in_cli(tmp_path / "bin"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert all(word in out for word in named), out[-2000:]
    assert not (workdir / "results").exists() and not (workdir / "logs").exists(), "a job ran"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A workflow copy in which every job up to the tables has 'run' (stand-in CLI) with the micro config."""
    base = tmp_path_factory.mktemp("recorded")
    workdir = copy_workflow(base / "wf")
    proc = snakemake(workdir, "--cores", "1", targets=TARGETS, check=False, path_first=stand_in_cli(base / "bin"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in snakemake(workdir, "-n", targets=TARGETS, check=False).stdout
    return workdir


def changes(workdir, config):
    """(rules whose outputs' params changed, {rule: outputs listed}, planned jobs per rule) against the record."""
    summary = snakemake(workdir, "--summary", config=config, targets=TARGETS, check=False)
    assert summary.returncode == 0, summary.stderr[-3000:]
    rows = [
        row
        for row in (line.split("\t") for line in summary.stdout.splitlines())
        if len(row) == 6 and row[0] != "output_file"
    ]
    changed = {row[2] for row in rows if row[4] == "params changed"}
    by_rule = {}
    for row in rows:
        by_rule.setdefault(row[2], set()).add(row[4])
    planned = planned_jobs(snakemake(workdir, "-n", config=config, targets=TARGETS, check=False))
    return changed, by_rule, planned


def test_the_defaults_spelled_out_or_not_are_the_same_run(recorded):
    config = write_config(recorded, lambda c: c.pop("runtime"), "no-runtime.yaml")
    assert "Nothing to be done" in snakemake(recorded, "-n", config=config, targets=TARGETS, check=False).stdout


@pytest.mark.parametrize("section", [{"dtype": "bfloat16"}, {"threads": 2}, {"device": "cpu"}])
def test_changing_a_runtime_value_reruns_every_job_that_uses_it(recorded, section):
    config = write_config(recorded, lambda c: c["runtime"].update(section), "changed.yaml")
    changed, by_rule, planned = changes(recorded, config)
    assert changed == set(VERBS)  # every model-producing (and evaluating) job ...
    assert all(by_rule[rule] == {"params changed"} for rule in VERBS)  # ... with all its outputs
    assert all(by_rule[rule] == {"ok"} for rule in TABLES)  # the tables only because their inputs are new
    assert set(planned) == set(VERBS) | TABLES


def test_gpus_of_one_kind_rerun_only_its_jobs(recorded):
    """auto becomes cuda on the tuning kind only: tuning and the tuned controls rerun (and the MoE table
    after them), nothing else."""
    config = write_config(recorded, lambda c: c["resources"].update(tune={"gpus": 1}), "tune-gpu.yaml")
    changed, _, planned = changes(recorded, config)
    assert changed == {"tune_moe", "tune_control"}
    assert planned == {"tune_moe": 2, "tune_control": 2, "moe_table": 1}
