"""Cached artifacts end to end: a run recorded with DVC and fetched into a fresh clone.

On workflow/config/micro.yaml: run the pipeline in a temporary git repository holding the working
tree, record it with the one documented command (workflow/scripts/record_artifacts.sh: `dvc commit`
and `dvc push` to a local remote), `git clone` afresh, fetch with the one documented command
(workflow/scripts/fetch_artifacts.sh), then check that every artifact is byte-identical,
that Snakemake has nothing to do, and that later changes (a config value, a rule's code, an
artifact's content) make Snakemake list exactly the jobs it lists in the producer's own checkout.
On copies of the same finished run: a recording is refused while an output the workflow expects is
missing (a deleted intermediate that `snakemake -n` does not rebuild, a job killed by SIGKILL), and
following the refusals' commands, verbatim, makes it succeed; a killed writer's temporary is never
recorded.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers.workflow import MICRO as CONFIG
from helpers.workflow import copy_worktree, env, failed_job_logs, files, needs_dvc, sh

pytestmark = [pytest.mark.slow, needs_dvc]  # subprocess-driven: outside the fast inner loop


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


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run of micro.yaml in a git repository holding the working tree, made once for
    the module; each test works on its own copy (``copy_run``)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    run.mkdir()
    copy_worktree(run)
    sh("snakemake", "--cores", "2", "--configfile", CONFIG, cwd=run)
    return run


def copy_run(finished, dest):
    """A copy of the finished run (timestamps kept, so Snakemake sees the same state)."""
    shutil.copytree(finished, dest, symlinks=True)
    return dest


def test_fetch_into_fresh_clone(tmp_path, finished):
    producer, consumer, early = tmp_path / "producer", tmp_path / "consumer", tmp_path / "early"
    remote = tmp_path / "remote"

    # producer: run, record, push (the documented producer steps)
    copy_run(finished, producer)
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
    assert expected["code"]["evaluate"] == 1 and not expected["code"].keys() & (
        upstream | {"prune_width", "prune_depth"}
    )
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


RECORD = "workflow/scripts/record_artifacts.sh"
#: intermediates every later stage is made from: deleting one leaves every consumer up to date
DENSE, CALIBRATION = "results/models/dense", "results/calibration/gen.safetensors"
WIDTH = "results/models/width/gen/cal-gen/act_norm/keep0.5"
PARTITION = "results/models/moe/gen/E4-k2-snake-paper-s0/none"


def record(cwd):
    """record_artifacts.sh (no push: the test remote is not set up): (exit status, its one line)."""
    r = sh("bash", RECORD, "--configfile", CONFIG, "--no-push", cwd=cwd, check=False)
    lines = [line for line in r.stderr.splitlines() if line.startswith("record_artifacts.sh: not recording:")]
    assert (r.returncode == 1) == bool(lines) and len(lines) <= 1, r.stdout + r.stderr
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode, lines[0] if lines else r.stderr


def advice(line):
    """The command a refusal ends with (after its last ': ')."""
    command = line.rsplit(": ", 1)[1]
    assert command.startswith("snakemake "), line
    return command


def follow(cwd, command):
    """Run a refusal's command as a user would paste it."""
    r = subprocess.run(["bash", "-c", command], cwd=cwd, env=env(), capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"{command}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}" + failed_job_logs(
        cwd, r.stdout + r.stderr
    )


def recorded_files(cwd):
    """Every file of results/ in the recording (dvc.lock's directory manifest, from the DVC cache)."""
    import yaml as _yaml

    lock = _yaml.safe_load((Path(cwd) / "dvc.lock").read_text())
    oid = next(o["md5"] for st in lock["stages"].values() for o in st["outs"] if o["path"] == "results")
    entries = json.loads((Path(cwd) / ".dvc/cache/files/md5" / oid[:2] / oid[2:]).read_text())
    return {"results/" + e["relpath"] for e in entries}


def test_record_refuses_missing_intermediates_until_rebuilt(tmp_path, finished):
    """The dense model, a calibration file and a width model deleted from a finished run: Snakemake
    has nothing to do, the recording names each of them. Its command rebuilds what is missing and
    what was made from it, after which the recording holds it (run for the width model alone, the
    cheapest to remake: the command has the same form for all; the killed run below remakes a
    partition the same way)."""
    run = copy_run(finished, tmp_path / "run")
    for path in (DENSE, CALIBRATION, WIDTH):
        shutil.rmtree(run / path) if (run / path).is_dir() else (run / path).unlink()
    assert planned(run) == {}, "Snakemake would rebuild them itself: this test no longer reproduces anything"

    status, line = record(run)
    assert status == 1 and "3 output(s) the workflow expects are missing" in line, line
    for path in (DENSE, CALIBRATION, WIDTH):
        assert path in line
    assert advice(line).endswith(f"--forcerun {CALIBRATION} {DENSE} {WIDTH}")
    assert not (run / "dvc.lock").exists()

    for path in (DENSE, CALIBRATION):  # back as they were (timestamps too): only the width model missing
        (shutil.copytree if (finished / path).is_dir() else shutil.copy2)(finished / path, run / path)
    status, line = record(run)
    assert status == 1 and "1 output(s) the workflow expects are missing" in line and WIDTH in line, line
    follow(run, advice(line))
    status, out = record(run)
    assert status == 0, out
    held = recorded_files(run)
    assert f"{DENSE}/model.safetensors" in held and CALIBRATION in held and f"{WIDTH}/model.safetensors" in held
    assert planned(run) == {}


def test_record_after_a_kill_follows_its_own_advice(tmp_path, finished):
    """SIGKILL (no cleanup at all) while a forced rerun of `partition` runs: its old outputs are gone,
    its consumers are up to date, locks and markers stay behind. The refusals' commands, followed as
    given, lead to a recording: `snakemake --unlock`, then the rebuild (plain --rerun-incomplete
    would not clear it: Snakemake ignores the marker of a missing output). A temporary the killed
    writer left is not recorded."""
    run = copy_run(finished, tmp_path / "run")
    markers, locks = run / ".snakemake/incomplete", run / ".snakemake/locks"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            ["snakemake", "--cores", "1", "--configfile", CONFIG, "--forcerun", "partition"],
            cwd=run,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not list(markers.glob("*")):  # marked once Snakemake has removed the job's old outputs
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the partition job never started"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(locks.glob("*.lock")) and list(markers.glob("*")) and not (run / PARTITION).exists()
    leftover = run / PARTITION.rsplit("/", 1)[0] / ".none.tmp-otherhost-4242-abcd"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")

    followed = []
    for _ in range(4):
        status, line = record(run)
        if status == 0:
            break
        followed.append(advice(line))
        follow(run, followed[-1])
    assert status == 0, followed
    assert followed[0].startswith("snakemake --unlock") and "--forcerun" in followed[1], followed
    assert PARTITION in followed[1] and len(followed) == 2, followed
    held = recorded_files(run)
    assert f"{PARTITION}/model.safetensors" in held
    assert not [f for f in held if ".tmp-" in f], "a killed writer's temporary was recorded"
    assert "temporary file(s) of killed writers are not recorded" in line
    assert not list(markers.glob("*")) and planned(run) == {}


def test_fetch_names_outputs_missing_from_a_recording(tmp_path, finished):
    """A recording made without the check (a bare `dvc commit`, or an older record_artifacts.sh) of
    a run that lacked the dense model: the fetch does not say "nothing to do", it names the missing
    output and the command that rebuilds it; with --check it exits 3."""
    producer, consumer, remote = copy_run(finished, tmp_path / "producer"), tmp_path / "consumer", tmp_path / "remote"
    shutil.rmtree(producer / DENSE)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=producer)
    sh("dvc", "commit", "-f", cwd=producer)
    sh("dvc", "push", cwd=producer)
    sh("git", "add", "dvc.lock", cwd=producer)
    sh("git", "commit", "-q", "-m", "record a run without its dense model", cwd=producer)
    sh("git", "clone", "-q", str(producer), str(consumer), cwd=tmp_path)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=consumer)

    r = sh("bash", "workflow/scripts/fetch_artifacts.sh", "--configfile", CONFIG, cwd=consumer)
    assert "Snakemake has nothing to do" not in r.stderr, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "the recorded run is not complete" in x]
    assert DENSE in line and advice(line).endswith(f"--forcerun {DENSE}")
    r = sh("bash", "workflow/scripts/fetch_artifacts.sh", "--configfile", CONFIG, "--check", cwd=consumer, check=False)
    assert r.returncode == 3, r.stderr
