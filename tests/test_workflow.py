"""The pipeline as a user drives it: config validation, incremental reruns (micro config)."""
import re

import pytest
import yaml

from test_figures import MICRO, copy_workflow, micro_run, snakemake  # noqa: F401  (micro_run is a fixture)

AGGREGATES = {"probes_table", "moe_table", "depth_figure", "width_figure", "moe_recovery_figure",
              "expert_load_figure", "quality_speed_figure", "all"}


def planned_jobs(proc) -> dict:
    """Rule -> job count from a dry run's "Job stats" table."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def write_config(workdir, edit) -> str:
    config = yaml.safe_load((workdir / MICRO).read_text())
    edit(config)
    path = workdir / "workflow" / "config" / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path.relative_to(workdir))


BAD = {
    "negative layers": (lambda c: c["model"].__setitem__("num_hidden_layers", -2), "num_hidden_layers"),
    "unknown key": (lambda c: c["train"].__setitem__("stpes", 10), "stpes"),
    "ratio above one": (lambda c: c["width"]["sweeps"][0].__setitem__("keep_ratio", [1.5]), "keep_ratio"),
    "experts not dividing width": (lambda c: c["moe"]["partitions"][0].__setitem__("num_experts", 5), "num_experts"),
    "top-k above experts": (lambda c: c["moe"]["partitions"][0].__setitem__("top_k", 9), "top_k"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_before_any_job(tmp_path, case):
    edit, key = BAD[case]
    workdir = copy_workflow(tmp_path / "wf")
    proc = snakemake(workdir, "--cores", "1", config=write_config(workdir, edit), check=False)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert not (workdir / "results").exists(), "a job ran before validation failed"


def test_second_run_has_nothing_to_do(micro_run):  # noqa: F811  (pytest fixture)
    assert planned_jobs(snakemake(micro_run, "-n")) == {}


def test_changing_one_ratio_reruns_only_that_ratio(micro_run):  # noqa: F811
    def edit(c):
        c["width"]["sweeps"][0]["keep_ratio"] = [0.6]

    jobs = planned_jobs(snakemake(micro_run, "-n", config=write_config(micro_run, edit)))
    components = len(yaml.safe_load((micro_run / MICRO).read_text())["width"]["sweeps"][0]["component"])
    assert jobs.pop("prune_width") == components
    assert set(jobs) <= AGGREGATES and {"probes_table", "all"} <= set(jobs)


def test_changing_evaluation_reruns_every_evaluation_but_not_training(micro_run):  # noqa: F811
    def edit(c):
        c["evaluate"]["num_steps"] += 1

    jobs = planned_jobs(snakemake(micro_run, "-n", config=write_config(micro_run, edit)))
    assert "train_tiny" not in jobs and "calibrate" not in jobs
    assert {"evaluate", "prune_width", "prune_depth", "partition", "tune_moe"} <= set(jobs)
