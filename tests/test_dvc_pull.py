"""Cached artifacts end to end: a run recorded with DVC and fetched into a fresh clone.

On workflow/config/micro.yaml: run the pipeline in a temporary git repository holding the working
tree, record it with the one documented command (workflow/scripts/record_artifacts.sh: `dvc commit`
and `dvc push` to a local remote), `git clone` afresh, fetch with the one documented command
(workflow/scripts/fetch_artifacts.sh), then check that every artifact is byte-identical,
that Snakemake has nothing to do, and that later changes (a config value, a rule's code, an
artifact's content) make Snakemake list exactly the jobs it lists in the producer's own checkout.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import failed_job_logs

REPO = Path(__file__).resolve().parents[1]
CONFIG = "workflow/config/micro.yaml"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not all((BIN / t).exists() or shutil.which(t) for t in ("snakemake", "dvc", "git")),
    reason="needs snakemake, dvc (workflow extras: workflow/scripts/setup.sh) and git",
)


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("UNISPARSE_SLURM_", "SNAKEMAKE_"))}
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.org")
    e.update(GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.org")
    e["DVC_NO_ANALYTICS"] = "1"
    return e


def sh(*cmd, cwd, check=True):
    r = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
                             + failed_job_logs(cwd, r.stdout + r.stderr))
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
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def planned(cwd):
    """Jobs `snakemake -n` would run, as {rule: count}; {} when there is nothing to do."""
    out = sh("snakemake", "-n", "--quiet", "rules", "--configfile", CONFIG, cwd=cwd).stdout
    if "Job stats:" not in out:
        assert "Nothing to be done" in out, out
        return {}
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def edit_config(cwd, change):
    path = Path(cwd) / CONFIG
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def narrow_width(config):
    config["width"]["sweeps"][0]["keep_ratio"] = [0.4]


def fewer_steps(config):
    config["evaluate"]["num_steps"] -= 1


def rule_file(cwd, rule):
    for path in sorted(Path(cwd, "rules").glob("*.smk")):
        if re.search(rf"^rule {rule}:", path.read_text(), re.M):
            return path
    raise AssertionError(f"no rule {rule} in rules/*.smk")


def change_code(cwd):
    """Reformat the evaluate rule's shell command (same command, different code)."""
    path = rule_file(cwd, "evaluate")
    text = path.read_text()
    head, body = text.split("rule evaluate:", 1)
    assert "unisparse --no-progress" in body
    path.write_text(head + "rule evaluate:" + body.replace("unisparse --no-progress", "unisparse  --no-progress", 1))


def change_artifact(cwd):
    """New content for an artifact other jobs read (as if its job had been rerun)."""
    path = Path(cwd, "results/calibration/gen.safetensors")
    path.write_bytes(path.read_bytes() + b" ")


def restore(cwd):
    sh("git", "checkout", "-q", "--", ".", cwd=cwd)


def test_fetch_into_fresh_clone(tmp_path):
    producer, consumer, early = tmp_path / "producer", tmp_path / "consumer", tmp_path / "early"
    remote = tmp_path / "remote"
    producer.mkdir()
    copy_worktree(producer)

    # producer: run, record, push (the documented producer steps)
    sh("snakemake", "--cores", "2", "--configfile", CONFIG, cwd=producer)
    assert planned(producer) == {}
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=producer)
    recorded = sh("bash", "workflow/scripts/record_artifacts.sh", "--configfile", CONFIG, cwd=producer)
    assert "git add dvc.lock" in recorded.stderr and (producer / "dvc.lock").is_file()
    assert list(remote.rglob("*.dir"))
    sh("git", "add", "dvc.lock", cwd=producer)
    sh("git", "commit", "-q", "-m", "record artifacts", cwd=producer)

    # consumer: fresh clone + the one documented command
    sh("git", "clone", "-q", str(producer), str(consumer), cwd=tmp_path)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=consumer)
    fetched = sh("bash", "workflow/scripts/fetch_artifacts.sh", "--configfile", CONFIG, "--check", cwd=consumer)
    assert "nothing to do" in fetched.stderr

    original, pulled = files(producer / "results"), files(consumer / "results")
    assert pulled.keys() == original.keys()
    assert [f for f in original if original[f] != pulled[f]] == []
    assert any(f.endswith(".safetensors") for f in pulled)
    assert planned(consumer) == {}

    # later changes: the fresh clone must plan exactly what the producer's checkout plans
    expected = {}
    for name, change in [("width", narrow_width), ("steps", fewer_steps)]:
        for cwd in (producer, consumer):
            edit_config(cwd, change)
        expected[name] = planned(producer)
        assert planned(consumer) == expected[name], name
        for cwd in (producer, consumer):
            restore(cwd)
    for cwd in (producer, consumer):
        change_code(cwd)
    expected["code"] = planned(producer)
    assert planned(consumer) == expected["code"]
    for cwd in (producer, consumer):
        restore(cwd)
        change_artifact(cwd)
    expected["artifact"] = planned(producer)
    assert planned(consumer) == expected["artifact"]

    # ... and what that is on micro.yaml: only the jobs downstream of the change
    upstream = {"train_tiny", "calibrate"}
    assert expected["width"]["prune_width"] == 2  # the two components at the new keep ratio
    assert {"probes_table", "all"} <= expected["width"].keys()
    assert not expected["width"].keys() & (upstream | {"evaluate", "prune_depth", "partition"})
    depth_jobs = 3  # micro.yaml: blocks of und and gen, and two sublayers of gen
    assert expected["steps"]["evaluate"] == 1 and expected["steps"]["prune_depth"] == depth_jobs
    assert expected["steps"]["prune_width"] == 2 and not expected["steps"].keys() & upstream
    assert expected["code"]["evaluate"] == 1 and not expected["code"].keys() & (upstream | {"prune_width", "prune_depth"})
    assert expected["artifact"]["prune_width"] == 2 and expected["artifact"]["prune_depth"] == depth_jobs
    assert not expected["artifact"].keys() & (upstream | {"evaluate"})

    # a clone whose config differs from the recorded artifacts before it fetches: the fetched
    # artifacts are not blessed (as `snakemake --touch` would), the difference is reported
    sh("git", "clone", "-q", str(producer), str(early), cwd=tmp_path)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=early)
    edit_config(early, narrow_width)
    edit_config(early, fewer_steps)
    r = sh("bash", "workflow/scripts/fetch_artifacts.sh", "--configfile", CONFIG, "--check", cwd=early, check=False)
    assert r.returncode == 3, r.stderr
    restore(early)
    edit_config(early, fewer_steps)
    assert planned(early) == expected["steps"]
