"""The workflow driven from tests: copies of it, the one Snakemake runner, dry-run job counts, a
stand-in ``unisparse`` command, and DVC's environment (shared by the Snakemake and DVC test modules)."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MICRO = "workflow/config/micro.yaml"
WORKFLOW_SOURCES = ["Snakefile", "environment.yml", "rules", "workflow", "notebooks", "data", "src"]


def copy_workflow(dst: Path) -> Path:
    """The workflow's sources (not results) in a fresh directory."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(
                src, dst / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"), dirs_exist_ok=True
            )
        elif src.exists():
            shutil.copy2(src, dst / name)
    return dst


def snakemake(
    workdir: Path, *args: str, targets=(), config: str = MICRO, check: bool = True, path_first=None
) -> subprocess.CompletedProcess:
    """Run Snakemake of this environment in `workdir`; its shell commands find `unisparse` and `papermill`
    (or, with `path_first`, a stand-in found first on PATH). Targets go first: several options
    (--configfile, --allowed-rules, --quiet) take a list of values. `check`: a failure fails the test."""
    path = os.pathsep.join([*([str(path_first)] if path_first else []), str(BIN), os.environ.get("PATH", "")])
    cmd = [str(BIN / "snakemake"), *targets, "--configfile", config, *args]
    proc = subprocess.run(cmd, cwd=workdir, env={**os.environ, "PATH": path}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


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


def failed_job_logs(cwd, output):
    """The logs of the jobs Snakemake reports as failed (the rules' own stderr), for the message."""
    names = []
    for block in re.findall(r"^Error in rule \w+:\n(.*?)(?=^\S|\Z)", output, re.M | re.S):
        names += re.findall(r"^\s+log: (\S+)", block, re.M)
    return "".join(
        f"\n--- {name}:\n{Path(cwd, name).read_text(errors='replace')[-3000:]}"
        for name in dict.fromkeys(names)
        if Path(cwd, name).is_file()
    )


def write_config(workdir: Path, edit, name="edited.yaml") -> str:
    """micro.yaml changed by `edit(config)`, written to `name` (relative to `workdir`); returns `name`."""
    config = yaml.safe_load((workdir / MICRO).read_text())
    edit(config)
    (workdir / name).write_text(yaml.safe_dump(config))
    return name


STAND_IN = '''#!/usr/bin/env python3
"""Stand-in for the unisparse CLI: creates the outputs named by --out, --metrics, --summary."""
import os, sys
args = sys.argv[1:]
for flag, value in zip(args, args[1:]):
    if flag in ("--out", "--metrics", "--summary"):
        if value.endswith((".json", ".csv", ".safetensors")):
            os.makedirs(os.path.dirname(value) or ".", exist_ok=True)
            for path in [value] + ([value + ".json"] if value.endswith(".safetensors") else []):
                with open(path, "w") as f:
                    f.write("{}")
        else:
            os.makedirs(value, exist_ok=True)
            with open(os.path.join(value, "config.json"), "w") as f:
                f.write("{}")
'''


def stand_in_cli(directory: Path) -> Path:
    """A directory holding an executable `unisparse` stand-in (put it first on PATH): Snakemake gets a
    record of every job in seconds, nothing trained."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "unisparse").write_text(STAND_IN)
    (directory / "unisparse").chmod(0o755)
    return directory


def interruptible() -> None:
    """Child-process setup: SIGINT handled by default again. A shell starts background jobs with SIGINT
    ignored, and an ignored signal is inherited: under such a job (CI in the background) the Ctrl-C
    these tests send would reach a Snakemake that ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- DVC: a run recorded in a git repository holding the working tree ------------------------------

#: the DVC modules' skip: they drive snakemake, dvc and git
needs_dvc = pytest.mark.skipif(
    not all((BIN / t).exists() or shutil.which(t) for t in ("snakemake", "dvc", "git")),
    reason="needs snakemake, dvc (workflow extras: workflow/scripts/setup.sh) and git",
)


def env():
    """This environment's tools first on PATH, no SLURM or Snakemake settings of the caller, a git
    identity, no DVC analytics."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("UNISPARSE_SLURM_", "SNAKEMAKE_"))}
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.org")
    e.update(GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.org")
    e["DVC_NO_ANALYTICS"] = "1"
    return e


def sh(*cmd, cwd, check=True):
    """A command in ``env()``; with `check`, a failure fails the test showing the failed jobs' logs."""
    r = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
            + failed_job_logs(cwd, r.stdout + r.stderr)
        )
    return r


def copy_worktree(dest):
    """The working tree as git sees it (tracked + untracked-not-ignored files), in a new repository."""
    listed = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-q", "-m", "working tree", cwd=dest)


def files(root):
    """{relative path: bytes} of every file under `root`."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}
