"""The pipeline as a user drives it: config validation, incremental reruns (micro config)."""

import json
import re

import pandas as pd
import pytest
import yaml

from helpers.workflow import MICRO, REPO, copy_workflow, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow  # drives Snakemake (or DVC) in subprocesses: outside the fast inner loop

AGGREGATES = {
    "probes_table",
    "moe_table",
    "depth_figure",
    "width_figure",
    "moe_recovery_figure",
    "expert_load_figure",
    "quality_speed_figure",
    "all",
}
#: where the edited configs go (beside micro.yaml)
EDITED = "workflow/config/edited.yaml"


BAD = {
    "negative layers": (lambda c: c["model"].__setitem__("num_hidden_layers", -2), "num_hidden_layers"),
    "unknown key": (lambda c: c["train"].__setitem__("stpes", 10), "stpes"),
    "ratio above one": (lambda c: c["width"]["sweeps"][0].__setitem__("keep_ratio", [1.5]), "keep_ratio"),
    "experts not dividing width": (lambda c: c["moe"]["partitions"][0].__setitem__("num_experts", 5), "num_experts"),
    "top-k above experts": (lambda c: c["moe"]["partitions"][0].__setitem__("top_k", 9), "top_k"),
    # issue 8, item 3: path settings outside results/ and logs/
    "results_dir absolute": (lambda c: c.__setitem__("results_dir", "/tmp/x"), "results_dir"),
    "results_dir parent": (lambda c: c.__setitem__("results_dir", "../x"), "results_dir"),
    "results_dir escaping": (lambda c: c.__setitem__("results_dir", "results/../../x"), "results_dir"),
    "results_dir empty": (lambda c: c.__setitem__("results_dir", ""), "results_dir"),
    "results_dir sibling": (lambda c: c.__setitem__("results_dir", "results2"), "results_dir"),
    "logs_dir outside": (lambda c: c.__setitem__("logs_dir", "/tmp/logs"), "logs_dir"),
    "results_dir quote": (lambda c: c.__setitem__("results_dir", "results/it's"), "results_dir"),
    "results_dir space": (lambda c: c.__setitem__("results_dir", "results/my run"), "results_dir"),
    # issue 8, item 4: values that only failed inside a job, or were accepted silently
    "drop above layers": (lambda c: c["depth"]["sweeps"][0].__setitem__("drop", [5]), "depth.sweeps[0].drop"),
    "kv heads not dividing heads": (lambda c: c["model"].__setitem__("num_key_value_heads", 3), "num_key_value_heads"),
    "shared expert as wide as the MLP": (
        lambda c: c["moe"]["partitions"][0].__setitem__("shared_size", 64),
        "shared_size",
    ),
    "shared expert wider than the MLP": (
        lambda c: c["moe"]["partitions"][0].__setitem__("shared_size", 80),
        "shared_size",
    ),
    "dense layer beyond the model": (lambda c: c["moe"].__setitem__("dense_layers", [5]), "moe.dense_layers"),
    "every layer dense": (lambda c: c["moe"].__setitem__("dense_layers", [0, 1]), "moe.dense_layers"),
    "typo in a resource kind": (lambda c: c["resources"].__setitem__("trian", {"threads": 1}), "trian"),
    "missing full tuning settings": (lambda c: c["moe"]["tune"].pop("full"), "moe.tune.full"),
    # allowed values come from unisparse.choices (the schema's `{choices: NAME}`)
    "unknown granularity": (
        lambda c: c["depth"]["sweeps"][0].__setitem__("granularity", ["block", "layer"]),
        "depth.sweeps[0].granularity[1]: 'layer' is not one of",
    ),
    "unknown router": (
        lambda c: c["moe"]["partitions"][0].__setitem__("router", "top1"),
        "moe.partitions[0].router: 'top1' is not one of ['paper', 'softmax']",
    ),
    "one QA weight too few": (lambda c: c["train"].__setitem__("qa_weights", [1, 1, 1]), "train.qa_weights"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_before_any_job(tmp_path, case):
    edit, key = BAD[case]
    workdir = copy_workflow(tmp_path / "wf")
    proc = snakemake(workdir, "--cores", "1", config=write_config(workdir, edit, EDITED), check=False)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert not (workdir / "results").exists(), "a job ran before validation failed"


def test_schema_takes_every_allowed_value_from_choices():
    """No enum is written out in the schema: each `{choices: NAME}` names a tuple of unisparse.choices,
    and the schema the workflow validates against states exactly those values."""
    from unisparse import choices
    from unisparse.config_checks import config_schema

    path = REPO / "workflow/schemas/config.schema.yaml"
    raw = path.read_text()
    assert not re.search(r"^\s*enum:|[{ ]enum:", raw, re.M), "an enum written out in the schema"
    names = set(re.findall(r"choices: ([A-Z_.a-z]+)", raw))
    assert {"COMPONENTS", "GRANULARITIES", "ROUTERS", "DTYPES", "BENCHMARKS.gen"} <= names
    schema = config_schema(path)
    assert schema["$defs"]["granularity"]["enum"] == list(choices.GRANULARITIES)
    assert schema["properties"]["moe"]["properties"]["tunings"]["items"]["enum"] == list(choices.TUNINGS)
    assert schema["$defs"]["benchmarks"]["properties"]["und"]["enum"] == list(choices.BENCHMARKS["und"])
    assert "choices" not in json.dumps(schema).replace("choices.", "")


def test_wildcard_constraints_take_their_values_from_choices():
    """No rule spells out a list of allowed values as a regex (`und|gen`): one_of(choices.X) builds it."""
    spelled = []
    for path in sorted((REPO / "rules").glob("*.smk")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""["'][a-z_]+(\|[a-z_]+)+["']""", line):
                spelled.append(f"{path.name}:{number}: {line.strip()}")
    assert spelled == []


def test_second_run_has_nothing_to_do(micro_run):
    assert planned_jobs(snakemake(micro_run, "-n")) == {}


def test_changing_one_ratio_reruns_only_that_ratio(micro_run):
    def edit(c):
        c["width"]["sweeps"][0]["keep_ratio"] = [0.6]

    jobs = planned_jobs(snakemake(micro_run, "-n", config=write_config(micro_run, edit, EDITED)))
    components = len(yaml.safe_load((micro_run / MICRO).read_text())["width"]["sweeps"][0]["component"])
    assert jobs.pop("prune_width") == components
    assert set(jobs) <= AGGREGATES and {"probes_table", "all"} <= set(jobs)


def test_changing_evaluation_reruns_every_evaluation_but_not_training(micro_run):
    def edit(c):
        c["evaluate"]["num_steps"] += 1

    jobs = planned_jobs(snakemake(micro_run, "-n", config=write_config(micro_run, edit, EDITED)))
    assert "train_tiny" not in jobs and "calibrate" not in jobs
    assert {"evaluate", "prune_width", "prune_depth", "partition", "tune_moe"} <= set(jobs)


def test_tuned_controls_get_the_moes_full_tuning(micro_run):
    """The dense model and the static cut at the MoE's active fraction are tuned with the MoE's full
    tuning settings and land in the MoE table; every score there carries its standard error."""
    table = pd.read_csv(micro_run / "results/tables/moe.csv")
    tuned = table[table.stage == "tuned"]
    assert set(tuned.variant_id) == {"tuned/dense", "tuned/width/gen/cal-gen/act_norm/keep0.5"}
    assert (tuned.tuning == "full").all()
    (moe_full,) = (micro_run / "results/tuning/moe").glob("gen/*/full.json")
    moe_settings = json.loads(moe_full.read_text())["tune"]
    for source in ("dense", "width/gen/cal-gen/act_norm/keep0.5"):
        summary = json.loads((micro_run / f"results/tuning/tuned/{source}.json").read_text())
        assert summary["tune"] == moe_settings and summary["mode"] == "full"
    overall = table[table.metric == "overall"]
    assert overall.se.notna().all() and (overall.se >= 0).all()


INJECTIONS = {
    "command substitution in results_dir": ("results_dir", "results/$(touch {marker})"),
    "command substitution in logs_dir": ("logs_dir", "logs/$(touch {marker})"),
    "semicolon in results_dir": ("results_dir", "results/x;touch {marker};"),
    "backticks in results_dir": ("results_dir", "results/`touch {marker}`"),
}


@pytest.mark.parametrize("case", sorted(INJECTIONS))
def test_shell_injection_through_the_config_runs_nothing(tmp_path, case):
    """A shared config must never run its author's commands (issue 8, item 1)."""
    key, template = INJECTIONS[case]
    marker = tmp_path / "PWNED"
    workdir = copy_workflow(tmp_path / "wf")
    config = write_config(workdir, lambda c: c.__setitem__(key, template.format(marker=marker)), EDITED)
    proc = snakemake(workdir, "--cores", "1", config=config, check=False)
    assert proc.returncode != 0 and key in proc.stdout + proc.stderr
    assert not marker.exists(), "the config ran a command"
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


def test_every_shell_placeholder_is_quoted():
    """Defence in depth: every {input}/{output}/{log}/{params}/{wildcards} in a shell command is `:q`."""
    unquoted = []
    for path in sorted((REPO / "rules").glob("*.smk")):
        in_shell = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("shell:"):
                in_shell = True
                continue
            if in_shell and not stripped.startswith(('"', "'")):
                in_shell = False
            if in_shell:
                unquoted += [
                    f"{path.name}:{number}: {m}"
                    for m in re.findall(r"\{(?:input|output|log|params|wildcards)[^}]*\}", line)
                    if not m.endswith(":q}")
                ]
    assert unquoted == []
