"""The SLURM profile end to end: `snakemake --profile slurm` on a single-node cluster.

The cluster (slurmctld, slurmd, munged) is started by this module's fixture with
workflow/scripts/slurm_cluster.sh (installing the Debian packages first where they are missing and
the machine allows it) and stopped again by PID files. The micro pipeline runs through the profile
in a temporary copy of the working tree: every job of a non-local rule must have run as a SLURM job
with the resources Snakemake gave it, local rules on the submitting host, and the artifacts must
match a local run. GPU requests are checked on the sbatch call itself (a stand-in sbatch records
it), since this cluster has no GPU; so is the launch of a multi-GPU tuning (torchrun, one process
per GPU), on the submission of a job whose inputs a stand-in CLI made.
"""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers.workflow import BIN, REPO, failed_job_logs, stand_in_cli
from helpers.workflow import MICRO as CONFIG

CLUSTER = REPO / "workflow/scripts/slurm_cluster.sh"
STATE = Path(os.environ.get("SLURM_TEST_STATE", "/var/tmp/unisparse-slurm"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(  # a SLURM cluster and Snakemake: outside the fast inner loop
        not ((BIN / "snakemake").exists() or shutil.which("snakemake")),
        reason="needs snakemake with the slurm executor plugin (workflow extras: workflow/scripts/setup.sh)",
    ),
]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("UNISPARSE_SLURM_", "SNAKEMAKE_", "SLURM_"))}
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(extra)
    return e


def sh(*cmd, cwd=REPO, check=True, **extra):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env(**extra), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
            + failed_job_logs(cwd, r.stdout + r.stderr)
        )
    return r


def copy_worktree(dest):
    """The working tree as git sees it (tracked + untracked-not-ignored files)."""
    listed = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def install_profile(workdir, xdg):
    """The profile made findable the documented way, in a private ~/.config."""
    sh("bash", "workflow/scripts/install_profile.sh", cwd=workdir, XDG_CONFIG_HOME=xdg)
    assert (Path(xdg) / "snakemake/slurm/config.yaml").is_file()


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM test cluster (slurmctld, slurmd, munged) needs root")
    installed = all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed:
        if not shutil.which("apt-get"):
            pytest.skip("SLURM is not installed and there is no apt-get to install it (slurm_cluster.sh install)")
        r = sh("bash", CLUSTER, "install", check=False)
        if r.returncode != 0:
            pytest.skip(f"SLURM is not installed and installing it failed: {r.stderr[-500:]}")
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and "slurm_cluster.sh" not in conf.read_text():
        pytest.skip("/etc/slurm/slurm.conf belongs to a real cluster; not running test jobs on it")
    running = sh("bash", CLUSTER, "status", check=False).returncode == 0
    if not running:
        sh("bash", CLUSTER, "start", SLURM_TEST_STATE=STATE)
    yield STATE
    if not running:
        sh("bash", CLUSTER, "stop", check=False, SLURM_TEST_STATE=STATE)


def declared_localrules(workdir):
    names = set()
    for path in [Path(workdir, "Snakefile"), *sorted(Path(workdir, "rules").glob("*.smk"))]:
        for block in re.findall(r"^localrules:(.*?)(?=^\S|\Z)", path.read_text(), re.M | re.S):
            names.update(re.findall(r"\w+", block))
    return names


def jobs_in_log(text):
    """Jobs Snakemake printed: [(local, rule, jobid, resources, threads)]."""
    jobs = []
    for m in re.finditer(r"^(localrule|rule) (\w+):\n(.*?)(?=^\S|\Z)", text, re.M | re.S):
        body = m[3]
        resources = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", body)[1]))
        threads = re.search(r"threads: (\d+)", body)
        jobs.append(
            (
                m[1] == "localrule",
                m[2],
                int(re.search(r"jobid: (\d+)", body)[1]),
                resources,
                int(threads[1]) if threads else 1,
            )
        )
    return jobs


def controller_records(state):
    records = {}
    for line in (Path(state) / "jobcomp.log").read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        records[fields["JobId"]] = fields
    return records


def strip_timings(value):
    """Measured wall-clock times are the only values allowed to differ between runs."""
    if isinstance(value, dict):
        return {k: strip_timings(v) for k, v in value.items() if k != "latency" and "seconds" not in k}
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value


def comparable(path):
    if path.suffix == ".json":
        return strip_timings(json.loads(path.read_text()))
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [
                {k: v for k, v in row.items() if "latency" not in k and "seconds" not in k} for row in csv.DictReader(f)
            ]
    return path.read_bytes()


def test_micro_pipeline_runs_as_slurm_jobs(cluster, tmp_path):
    local, remote = copy_worktree(tmp_path / "local"), copy_worktree(tmp_path / "slurm")
    local_rules = declared_localrules(remote)
    # the reference: a local run of everything SLURM will run (local rules run locally either way);
    # it runs while the SLURM run mostly waits for its status polls
    reference = subprocess.Popen(
        ["snakemake", "--cores", "1", "--configfile", CONFIG, "--omit-from", *sorted(local_rules)],
        cwd=local,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    install_profile(remote, tmp_path / "xdg")
    r = sh(
        "snakemake",
        "--profile",
        "slurm",
        "--configfile",
        CONFIG,
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-keep-successful-logs",
        cwd=remote,
        check=False,
        XDG_CONFIG_HOME=tmp_path / "xdg",
    )
    out, _ = reference.communicate()
    assert r.returncode == 0, f"{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    assert reference.returncode == 0, out[-6000:]
    log = r.stdout + r.stderr
    assert "Using profile slurm" in log
    run_id = re.search(r"SLURM run ID: (\S+)", log)[1]
    submitted = {int(a): b for a, b in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)}
    jobs = jobs_in_log(log)
    records = controller_records(cluster)

    assert [j for j in jobs if not j[0]], "no job ran as a SLURM job"
    for is_local, rule, jobid, resources, threads in jobs:
        if is_local:  # aggregation/table/figure rules (and `all`) stay on the submitting host
            assert rule in local_rules | {"all"}, f"{rule} ran locally but is not a localrule"
            assert jobid not in submitted
            continue
        assert rule not in local_rules
        slurm_id = submitted[jobid]  # KeyError: a non-local job that was not submitted
        record = records[slurm_id]  # the controller's record of the finished job
        assert record["JobState"] == "COMPLETED" and record["Name"] == run_id
        assert Path(record["WorkDir"]) == remote
        assert f"mem={resources['mem_mb']}M" in record["Tres"] and f"cpu={threads}" in record["Tres"]
        assert record["TimeLimit"] == resources["runtime"]
        assert "gpu" not in record["Tres"]
        assert list((remote / ".snakemake/slurm_logs").glob(f"rule_{rule}/**/{slurm_id}.log")), "per-job SLURM log"
    assert len(submitted) == sum(not j[0] for j in jobs)

    # the same artifacts as the local run: bytes, except measured timings in JSON/CSV
    theirs = sorted(p.relative_to(local) for p in (local / "results").rglob("*") if p.is_file())
    assert theirs and all((remote / p).is_file() for p in theirs)
    differ = [str(p) for p in theirs if comparable(remote / p) != comparable(local / p)]
    assert differ == []
    exact = [p for p in theirs if p.suffix == ".safetensors" or "calibration" in p.parts]
    assert exact and [str(p) for p in exact if (remote / p).read_bytes() != (local / p).read_bytes()] == []
    assert "Nothing to be done" in sh("snakemake", "-n", "--configfile", CONFIG, cwd=remote).stdout


FAKE_SLURM = {
    # records each submission and refuses it: no job runs, the call is what is checked
    "sbatch": 'printf "%s\\n" "$*" >> "$FAKE_SBATCH_CALLS"; echo "fake sbatch: recorded" >&2; exit 1',
    "sinfo": 'printf "PARTITION\\ndebug*\\n"',
    "squeue": "exit 0",
    "sacct": 'echo "Slurm accounting storage is disabled" >&2; exit 1',
    "scontrol": "exit 1",
    "sacctmgr": "echo proj",
}


def submitted_calls(workdir, tmp_path, configfile, **site):
    return submit(workdir, tmp_path, configfile, **site)[0]


def submit(workdir, tmp_path, configfile, *args, **site):
    """(the sbatch calls, Snakemake's output) of `snakemake --profile slurm ... *args` with a stand-in sbatch."""
    fake = tmp_path / "fake-slurm"
    fake.mkdir(exist_ok=True)
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    calls = tmp_path / "sbatch-calls.txt"
    calls.unlink(missing_ok=True)
    r = sh(
        "snakemake",
        "--profile",
        "slurm",
        "--configfile",
        configfile,
        "--slurm-init-seconds-before-status-checks",
        "1",
        *args,
        cwd=workdir,
        check=False,
        XDG_CONFIG_HOME=tmp_path / "xdg",
        FAKE_SBATCH_CALLS=calls,
        PATH=f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
        **site,
    )
    assert calls.exists(), f"no sbatch call:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return calls.read_text().splitlines(), r.stdout + r.stderr


def workdir_with_gpus(tmp_path, kind, gpus, name):
    """A copy of the worktree with the profile installed and a config `name` whose job kind `kind`
    asks for `gpus` GPUs."""
    workdir = copy_worktree(tmp_path / "work")
    install_profile(workdir, tmp_path / "xdg")
    config = yaml.safe_load((workdir / CONFIG).read_text())
    config["resources"][kind] = {"gpus": gpus}
    (workdir / name).write_text(yaml.safe_dump(config))
    return workdir


def test_gpu_resources_reach_the_sbatch_call(tmp_path):
    workdir = workdir_with_gpus(tmp_path, "train", 1, "gpu.yaml")

    # the first job of the DAG (train_tiny, job kind `train`) is the one submitted
    (call,) = submitted_calls(workdir, tmp_path, "gpu.yaml")
    assert "rule_train_tiny" in call
    assert re.search(r"--gpus[= ]1\b", call) and "--gres" not in call
    assert "--mem 1000" in call and "-t 10" in call and "-p debug" in call

    (call,) = submitted_calls(workdir, tmp_path, CONFIG)  # CPU only: no GPU request
    assert "rule_train_tiny" in call and "--gpus" not in call and "--gres" not in call

    # the site's dialect: environment variables and the untracked site.yaml
    (workdir / "workflow/profiles/slurm/site.yaml").write_text("partition: cpuq\ngpu_partition: gpuq\n")
    (call,) = submitted_calls(
        workdir, tmp_path, "gpu.yaml", UNISPARSE_SLURM_GPU="gres", UNISPARSE_SLURM_GPU_MODEL="a100"
    )
    assert "--gres=gpu:a100:1" in call and "--gpus" not in call and "-p gpuq" in call
    (call,) = submitted_calls(workdir, tmp_path, CONFIG, UNISPARSE_SLURM_ACCOUNT="proj", UNISPARSE_SLURM_QOS="short")
    assert "-p cpuq" in call and "--qos=short" in call and "-A proj" in call


def test_multi_gpu_tuning_is_one_job_running_one_process_per_gpu(tmp_path):
    """resources.tune.gpus: 2 -> one SLURM job asking for 2 GPUs whose command is torchrun with 2 processes."""
    workdir = workdir_with_gpus(tmp_path, "tune", 2, "tune2.yaml")
    # the tuning's inputs (dense model, calibration, partition), made by a stand-in CLI in seconds,
    # so that the first job the profile submits is the first tuning
    sh(
        "snakemake",
        "--cores",
        "1",
        "--configfile",
        "tune2.yaml",
        "--until",
        "partition",
        cwd=workdir,
        PATH=f"{stand_in_cli(tmp_path / 'stand-in')}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
    )

    (call,), log = submit(workdir, tmp_path, "tune2.yaml", "--until", "tune_moe")
    assert "rule_tune_moe" in call and re.search(r"--target-jobs '?tune_moe:[^ ]*tuning=frozen", call)
    assert re.search(r"--gpus[= ]2\b", call) and "--gres" not in call
    assert re.search(r"--configfiles \S*tune2\.yaml", call)  # the job formats its command with this config
    # the command that job runs, as the submitting Snakemake printed it (printshellcmds in the profile)
    (block,) = re.findall(r"^rule tune_moe:\n(.*?)^Shell command: (.*)$", log, re.M | re.S)
    assert "tuning=frozen" in block[0]
    argv = shlex.split(block[1])
    assert argv[:8] == [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "unisparse",
        "--no-progress",
        "tune-moe",
    ]
    assert argv[argv.index("--device") + 1] == "cuda"


def test_a_two_node_tuning_asks_sbatch_for_the_nodes_and_runs_torchrun_on_each(tmp_path):
    """resources.tune: {gpus: 2, nodes: 2} -> sbatch --nodes 2 with 2 GPUs (per node), and the job's
    command is the multi-node launcher (srun torchrun --nnodes, tests/test_multinode.py)."""
    workdir = workdir_with_gpus(tmp_path, "tune", 2, "nodes.yaml")
    config = yaml.safe_load((workdir / "nodes.yaml").read_text())
    config["resources"]["tune"]["nodes"] = 2
    (workdir / "nodes.yaml").write_text(yaml.safe_dump(config))
    stand_in = stand_in_cli(tmp_path / "stand-in")
    sh("snakemake", "--cores", "1", "--configfile", "nodes.yaml", "--until", "partition", cwd=workdir,
       PATH=f"{stand_in}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    (call,), log = submit(workdir, tmp_path, "nodes.yaml", "--until", "tune_moe")
    assert "rule_tune_moe" in call and re.search(r"--nodes[= ]2\b", call) and re.search(r"--gpus[= ]2\b", call)
    (block,) = re.findall(r"^rule tune_moe:\n(.*?)^Shell command: (.*)$", log, re.M | re.S)
    argv = shlex.split(block[1])
    assert (
        argv[0] == "sh"
        and argv[1].endswith("workflow/scripts/torchrun_nodes.sh")
        and argv[2:5] == ["2", "-m", "unisparse"]
    )


def test_the_profile_plans_the_papers_dag_by_default(tmp_path):
    """`snakemake -n --profile slurm` (no --configfile) lists the reproduction on BAGEL-7B-MoT from the
    download to the figures; each job's GPUs and runtime are the config's, and the GPU-hours add up."""
    workdir = copy_worktree(tmp_path / "work")
    install_profile(workdir, tmp_path / "xdg")
    r = sh("snakemake", "-n", "--profile", "slurm", cwd=workdir, XDG_CONFIG_HOME=tmp_path / "xdg")
    out = r.stdout + r.stderr
    jobs = re.findall(r"^rule (\w+):\n(?:.*\n)*?\s+resources: (.*)$", out, flags=re.M)
    counts = {}
    gpu_minutes = 0
    paper = yaml.safe_load((workdir / "workflow/config/paper.yaml").read_text())
    kind = {
        "download_checkpoint": "download",
        "download_tune_data": "download",
        "download_input": "download",
        "import_checkpoint": "import",
        "prepare_tune_data": "prepare",
        "calibrate": "calibrate",
        "evaluate": "evaluate",
        "prune_depth": "prune",
        "prune_width": "prune",
        "partition": "prune",
        "tune_moe": "tune",
        "tune_control": "tune",
    }
    for rule, resources in jobs:
        counts[rule] = counts.get(rule, 0) + 1
        res = dict(item.split("=", 1) for item in resources.split(", "))
        if rule in kind:
            want = {**paper["resources"]["default"], **paper["resources"][kind[rule]]}
            assert (int(res["runtime"]), int(res.get("gpus", 0))) == (want["runtime"], want["gpus"]), rule
            gpu_minutes += int(res.get("gpus", 0)) * int(res["runtime"])
    chain = [
        "download_checkpoint",
        "import_checkpoint",
        "calibrate",
        "evaluate",
        "prune_depth",
        "prune_width",
        "partition",
        "download_tune_data",
        "prepare_tune_data",
        "tune_moe",
        "tune_control",
        "probes_table",
        "moe_table",
        "depth_figure",
        "width_figure",
        "moe_recovery_figure",
        "expert_load_figure",
        "quality_speed_figure",
    ]
    assert set(chain) <= set(counts), sorted(set(chain) - set(counts))
    assert "train_tiny" not in counts
    # the grids of paper.yaml: 2 tasks; depth (und: 2 tasks, gen: 1) x (5 block + 2 x 3 sublayer drops) + 1
    # published; width 3 calibrated pairs x 4 ratios + 2 components x 3 data-free/published scores
    assert counts["calibrate"] == 2 and counts["prune_depth"] == 3 * (5 + 6) + 1 and counts["prune_width"] == 3 * 4 + 6
    assert counts["partition"] == 2 and counts["tune_moe"] == 4 and counts["tune_control"] == 2
    print("jobs per rule:", counts, f"GPU-hours: {gpu_minutes / 60:.0f}")
    assert counts["download_tune_data"] == 1 and counts["prepare_tune_data"] == 1  # the tuning data, once
    assert counts["download_checkpoint"] == 1 and counts["download_input"] == 4  # detector, CLIP, MME, POPE
    assert gpu_minutes / 60 == 2 * 4 + 12 + 54 * 13 + 6 * 8 * 36 + 2  # + preparing the tuning latents


def test_the_papers_dag_writes_nothing_into_a_finished_default_study(micro_run, tmp_path):
    """On a checkout whose default study is complete (the micro study stands in: same `results/` and
    `logs/`), `snakemake -n --profile slurm` plans only jobs whose outputs lie in the paper's own
    subtree, and the default study still plans nothing."""
    workdir = copy_worktree(tmp_path / "work")
    for name in ("results", "logs", ".snakemake"):
        shutil.copytree(micro_run / name, workdir / name, symlinks=True, ignore=shutil.ignore_patterns("locks"))
    install_profile(workdir, tmp_path / "xdg")
    paper = yaml.safe_load((workdir / "workflow/config/paper.yaml").read_text())
    r = sh("snakemake", "-n", "--profile", "slurm", cwd=workdir, XDG_CONFIG_HOME=tmp_path / "xdg")
    outputs = [
        path
        for line in re.findall(r"^\s+(?:output|log): (.*)$", r.stdout + r.stderr, flags=re.M)
        for path in line.split(", ")
    ]
    assert len(outputs) > 100
    own = (paper["results_dir"] + "/", paper["logs_dir"] + "/")
    assert paper["results_dir"] != "results" and paper["logs_dir"] != "logs"
    assert [p for p in outputs if not p.startswith(own)] == []
    again = sh(str(BIN / "snakemake"), "-n", "--configfile", CONFIG, "--cores", "1", cwd=workdir)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_the_rehearsals_download_is_local_and_its_evaluation_a_slurm_job(cluster, tmp_path, local_hub):
    """The paper rehearsal through the profile on the test cluster, up to the dense model's
    evaluation: the locked downloads run as local rules on the submitting host (against the local
    Hub), the import and the evaluation (a GPU kind in paper.yaml) as SLURM jobs, offline."""
    from helpers.rehearsal import bagel_repositories, serve, write_locks

    repositories = bagel_repositories(tmp_path / "repos")
    commits = serve(local_hub, repositories)
    remote = copy_worktree(tmp_path / "slurm")
    write_locks(remote, repositories, commits)
    install_profile(remote, tmp_path / "xdg")
    config = "workflow/config/rehearsal_paper.yaml"
    r = sh(
        "snakemake",
        "results/rehearsal_paper/metrics/dense.json",
        "--profile",
        "slurm",
        "--configfile",
        config,
        "--slurm-init-seconds-before-status-checks",
        "2",
        cwd=remote,
        check=False,
        XDG_CONFIG_HOME=tmp_path / "xdg",
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    submitted = {int(a): b for a, b in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)}
    jobs = {(rule, is_local, jobid) for is_local, rule, jobid, _, _ in jobs_in_log(log)}
    records = controller_records(cluster)
    ran = {}
    for rule, is_local, jobid in jobs:
        ran.setdefault(rule, set()).add(is_local)
        if not is_local:
            assert records[submitted[jobid]]["JobState"] == "COMPLETED", rule
    assert ran["download_checkpoint"] == {True} and ran["download_input"] == {True}
    assert ran["import_checkpoint"] == {False} and ran["evaluate"] == {False}
    metrics = json.loads((remote / "results/rehearsal_paper/metrics/dense.json").read_text())
    assert {"geneval", "mme"} <= set(metrics["eval"]["benchmarks"].values())
