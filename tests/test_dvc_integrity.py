"""Recording only finished runs, and never accepting a corrupted artifact silently.

One partial run of workflow/config/micro.yaml (the dense model and the `gen` calibration) is
recorded with plain `dvc commit` + `dvc push` to a local remote, once for the module; then:
- workflow/scripts/record_artifacts.sh refuses, and leaves dvc.lock and the remote as they are,
  for that incomplete run, while a real Snakemake run is in progress, and after it was interrupted;
- workflow/scripts/fetch_artifacts.sh names a file whose object is corrupted in the remote (with
  and without the remote's `verify`) or whose directory manifest is, exits with status 4, leaves no
  corrupted copy behind, and fetches the recorded file once the remote is repaired;
- the command fetch_artifacts.sh prints for the reasons of what would still run runs.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers.workflow import MICRO as CONFIG
from helpers.workflow import copy_worktree, env, files, interruptible, needs_dvc, sh

pytestmark = [pytest.mark.slow, needs_dvc]  # snakemake, dvc and git in subprocesses: outside the fast inner loop

RECORD = "workflow/scripts/record_artifacts.sh"
FETCH = "workflow/scripts/fetch_artifacts.sh"
BUILT = "results/calibration/gen.safetensors"  # the target of the recorded partial run
NEXT = "results/metrics/dense.json"  # a job the recorded run did not run (evaluate, a few seconds)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    producer, remote = root / "producer", root / "remote"
    producer.mkdir()
    copy_worktree(producer)
    sh("snakemake", BUILT, "--cores", "2", "--configfile", CONFIG, cwd=producer)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=producer)
    # a partial run, recorded on purpose with the bare commands (record_artifacts.sh refuses it)
    sh("dvc", "commit", "-f", cwd=producer)
    sh("dvc", "push", cwd=producer)
    sh("git", "add", "dvc.lock", cwd=producer)
    sh("git", "commit", "-q", "-m", "record a partial run", cwd=producer)
    return SimpleNamespace(root=root, producer=producer, remote=remote)


def clone(recorded, dest, remote):
    sh("git", "clone", "-q", str(recorded.producer), str(dest), cwd=recorded.root)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=dest)
    return dest


def fetch(cwd, *args, check=True):
    return sh("bash", FETCH, "--configfile", CONFIG, *args, cwd=cwd, check=check)


def listing(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*"))


def manifest(repo, out):
    """The .dir object of a directory out in dvc.lock, from the repository's DVC cache: {relpath: md5}."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    oid = next(o["md5"] for s in lock["stages"].values() for o in s["outs"] if o["path"] == out)
    entries = json.loads((repo / ".dvc/cache/files/md5" / oid[:2] / oid[2:]).read_text())
    return oid, {e["relpath"]: e["md5"] for e in entries}


def damage(path, change):
    path.chmod(0o644)  # DVC keeps objects read-only
    path.write_bytes(change(path.read_bytes()))


def test_record_refuses_unfinished_runs(recorded):
    producer = recorded.producer
    lock, pushed = (producer / "dvc.lock").read_bytes(), listing(recorded.remote)

    def refusal():
        r = sh("bash", RECORD, "--configfile", CONFIG, cwd=producer, check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert (producer / "dvc.lock").read_bytes() == lock and listing(recorded.remote) == pushed
        lines = [line for line in r.stderr.splitlines() if line.startswith("record_artifacts.sh:")]
        assert len(lines) == 1 and "not recording" in lines[0], r.stderr
        return lines[0]

    # the recorded run is incomplete: the dry run would still run jobs
    assert "would still run" in refusal()

    # a real run in progress, then interrupted as by Ctrl-C: Snakemake stops the job and releases its
    # locks, and keeps the job's marker in .snakemake/incomplete
    locks, markers = producer / ".snakemake/locks", producer / ".snakemake/incomplete"
    with open(recorded.root / "background.log", "w") as log:
        run = subprocess.Popen(
            ["snakemake", NEXT, "--cores", "1", "--configfile", CONFIG],
            cwd=producer,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=interruptible,
        )
    try:
        deadline = time.monotonic() + 180
        while not (list(locks.glob("*.lock")) and list(markers.glob("*"))):  # locked, and the job started
            assert run.poll() is None, (recorded.root / "background.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no Snakemake job started"
            time.sleep(0.05)
        assert "in progress" in refusal()
        assert run.poll() is None, "the job ended before the run could be interrupted"
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode != 0 and not list(locks.glob("*.lock")) and list(markers.glob("*"))
    line = refusal()
    assert "interrupted" in line and NEXT in line and "--rerun-incomplete" in line


@pytest.mark.parametrize("damaged, verify", [("object", True), ("object", False), ("manifest", True)])
def test_corrupted_remote_is_named(recorded, tmp_path, damaged, verify):
    bad = tmp_path / "remote"
    shutil.copytree(recorded.remote, bad)
    oid, entries = manifest(recorded.producer, "results")
    name = BUILT.removeprefix("results/")
    if damaged == "object":  # same size, other content: only a checksum tells
        target = entries[name]
        damage(bad / "files/md5" / target[:2] / target[2:], lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]))
    else:  # a directory manifest that still parses, with a wrong file list
        damage(bad / "files/md5" / oid[:2] / oid[2:], lambda b: b.replace(b"calibration/", b"calibratiox/"))
    consumer = clone(recorded, tmp_path / "consumer", bad)
    if not verify:
        sh("dvc", "remote", "modify", "--local", "local", "verify", "false", cwd=consumer)

    r = fetch(consumer, check=False)
    assert r.returncode == 4, r.stderr
    named = [line for line in r.stderr.splitlines() if line.startswith("fetch_artifacts.sh: NOT AS RECORDED:")]
    if damaged == "object":
        assert any(f" {BUILT}: corrupted" in line for line in named), r.stderr
        assert not (consumer / BUILT).exists()  # DVC (verify) or the script removed it
    else:
        assert any(" results/: its file list" in line and "corrupted" in line for line in named), r.stderr
    # no corrupted copy stays in the cache: once the remote is repaired, the recorded files arrive
    sh("dvc", "remote", "modify", "--local", "local", "url", str(recorded.remote), cwd=consumer)
    r = fetch(consumer)
    assert "have their recorded md5" in r.stderr
    assert files(consumer / "results") == files(recorded.producer / "results")


def test_suggested_command_runs(recorded, tmp_path):
    consumer = clone(recorded, tmp_path / "consumer", recorded.remote)
    r = fetch(consumer)  # exit 0 without --check, although jobs remain
    assert "Snakemake would still run" in r.stderr
    command = re.search(r"^fetch_artifacts\.sh: reasons: (.+)$", r.stderr, re.M)[1]
    assert command.startswith("snakemake -n ") and CONFIG in command
    dry = subprocess.run(["bash", "-c", command], cwd=consumer, env=env(), capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert f"reason: Missing output files: {NEXT}" in dry.stdout + dry.stderr
    assert fetch(consumer, "--check", check=False).returncode == 3
