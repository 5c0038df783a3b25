"""The real DAGs rehearsed end to end: Snakemake runs a rehearsal config (the paper's DAG shape at
toy sizes, on the CPU) against the local Hub, from the locked downloads to the figures; then, with the
network cut, a rerun plans nothing and a forced evaluation runs from the cache alone."""

import csv

import pytest
import yaml

from helpers.rehearsal import bagel_repositories, qwen_image_repositories, serve, write_locks
from helpers.workflow import copy_workflow, failed_job_logs, planned_jobs, snakemake

pytestmark = pytest.mark.slow  # whole Snakemake runs: outside the fast inner loop

FIGURES = ("depth_curves", "width_curves", "moe_recovery", "expert_load", "quality_speed")
#: per rehearsal: its config, its repositories, and the variants its tables hold, counted from the config:
#: probes (dense, depth, width), moe (dense, the MoE untuned and tuned, the tuned controls, and the
#: static width cut at the MoE's active fraction, which both width grids hold)
REHEARSALS = {
    "paper": ("workflow/config/rehearsal_paper.yaml", bagel_repositories, {"probes": 1 + 6 + 2, "moe": 1 + 3 + 2 + 1}),
    "qwen_image": (
        "workflow/config/rehearsal_qwen_image.yaml",
        qwen_image_repositories,
        {"probes": 1 + 9 + 3, "moe": 1 + 2 + 1},
    ),
}


def run(workdir, config, *args, targets=(), check=True):
    proc = snakemake(workdir, *args, targets=targets, config=config, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-5000:] + failed_job_logs(workdir, proc.stderr)
    return proc


@pytest.mark.parametrize("name", sorted(REHEARSALS))
def test_the_real_dag_rehearsed_against_the_local_hub(tmp_path, local_hub, monkeypatch, name):
    config, repositories_of, expected = REHEARSALS[name]
    repositories = repositories_of(tmp_path / "repos")
    commits = serve(local_hub, repositories)
    workdir = copy_workflow(tmp_path / "wf")
    write_locks(workdir, repositories, commits)
    jobs = planned_jobs(run(workdir, config, "-n", "--cores", "2"))
    for rule in ("download_checkpoint", "download_input", "download_tune_data", "import_checkpoint",
                 "calibrate", "prune_depth", "prune_width", "partition", "prepare_tune_data", "tune_moe",
                 "evaluate", "probes_table", "moe_table"):  # fmt: skip
        assert jobs.get(rule), (rule, jobs)
    assert jobs["download_input"] == 4 and jobs["calibrate"] == 2

    run(workdir, config, "--cores", "2")
    results = workdir / "results" / f"rehearsal_{name}"
    assert sorted(p.name for p in (results / "figures").glob("*.png")) == sorted(f"{f}.png" for f in FIGURES)
    for table, count in expected.items():
        rows = list(csv.DictReader((results / f"tables/{table}.csv").open()))
        variants = {r["variant_id"] for r in rows}
        assert len(variants) == count, (table, sorted(variants))
        for variant in variants:
            benchmarks = {r["benchmark"] for r in rows if r["variant_id"] == variant}
            assert {"GenEval", "MME"} <= benchmarks, (table, variant, benchmarks)
    served = local_hub.count("/resolve/")
    assert served > 0
    cache = yaml.safe_load((workdir / config).read_text())["hub"]["cache"]
    if cache:  # the config's cache, not the environment's, is the one every rule used
        assert (workdir / cache / "datasets--lmms-lab--MME").is_dir()

    # the network cut: the Hub stopped and HF_HUB_OFFLINE=1 in the user's environment
    local_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert planned_jobs(run(workdir, config, "-n", "--cores", "1")) == {}
    dense = f"results/rehearsal_{name}/metrics/dense.json"
    run(workdir, config, "--cores", "1", "--forcerun", "evaluate", "--allowed-rules", "evaluate", targets=[dense])
    assert local_hub.count("/resolve/") == served
