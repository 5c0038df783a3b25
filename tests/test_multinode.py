"""A tuning job over several nodes (issue 24): ``resources.tune.nodes`` asks sbatch for the nodes and
runs ``srun torchrun --nnodes`` over the allocation, the rendezvous on its first node. The rule's
command is read from a dry run; the launch script runs with stand-ins for ``srun`` and ``scontrol``
that record what they were asked."""

import os
import re
import shlex
import subprocess

import pytest

from helpers.workflow import REPO, copy_workflow, snakemake, write_config

pytestmark = pytest.mark.slow  # Snakemake in a subprocess

SCRIPT = REPO / "workflow/scripts/torchrun_nodes.sh"


def test_a_two_node_tuning_runs_srun_torchrun_over_the_allocation(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    name = write_config(workdir, lambda c: c["resources"].update(tune={"gpus": 2, "nodes": 2}), "nodes.yaml")
    proc = snakemake(workdir, "-n", "-p", config=name)
    shell = re.findall(r"^Shell command: (.*tune-moe.*)$", proc.stdout, re.M)
    assert shell
    argv = shlex.split(shell[0])
    assert argv[:7] == ["sh", str(workdir / "workflow/scripts/torchrun_nodes.sh"), "2", "-m", "unisparse",
                        "--no-progress", "tune-moe"]  # fmt: skip
    assert argv[argv.index("--device") + 1] == "cuda"
    tuning = re.findall(r"^rule tune_(?:moe|control):\n(.*?)^Shell command", proc.stdout, re.M | re.S)
    assert tuning and all(re.search(r"resources: .*\bnodes=2\b", b) for b in tuning), "sbatch is asked for 2 nodes"
    others = re.findall(r"^rule (?!tune_)\w+:\n(.*?)^Shell command", proc.stdout, re.M | re.S)
    assert others and not any("nodes=" in b for b in others)

    # the script inside the allocation: one torchrun per node, meeting on the first node
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n'
    )
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    for tool in ("scontrol", "srun"):
        (fake / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "srun.txt"),
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242"}  # fmt: skip
    subprocess.run(["sh", str(SCRIPT), "2", "-m", "unisparse", "tune-moe", "model"], env=env, check=True)
    assert (tmp_path / "srun.txt").read_text().splitlines() == [
        "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "torchrun", "--nnodes=2",
        "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:29500", "--rdzv-id=4242",
        "-m", "unisparse", "tune-moe", "model",
    ]  # fmt: skip
    outside = subprocess.run(["sh", str(SCRIPT), "2"], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert outside.returncode != 0 and "inside a SLURM allocation" in outside.stderr


def test_nodes_on_a_single_process_kind_are_refused(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    name = write_config(workdir, lambda c: c["resources"].update(evaluate={"nodes": 2}), "bad.yaml")
    proc = snakemake(workdir, "-n", config=name, check=False)
    assert proc.returncode != 0 and "resources.evaluate.nodes: 2 nodes, but" in proc.stdout + proc.stderr
