"""A recording is of a complete run (unisparse.records, used by workflow/scripts/record_artifacts.sh).

Unit tests on a hand-made ``snakemake --summary`` and workspace; the end-to-end refusals (a deleted
dense model, a calibration file, a width model, a killed job) run on a finished micro run in
test_dvc_pull.py. Also: the temporaries of killed writers are never recorded (.dvcignore).
"""

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unisparse import records
from unisparse.io import write_manifest

REPO = Path(__file__).resolve().parents[1]
HEADER = "\t".join(records.SUMMARY_HEADER)


def row(path, status="ok", plan="no update", rule="r"):
    return "\t".join((path, "-", rule, "-", status, plan))


def summary(*rows, noise=("Building DAG of jobs...", "config checked")):
    return "\n".join([*noise, HEADER, *rows]) + "\n"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A workspace like a finished run's: a dense model directory with its SHA256SUMS, one file."""
    monkeypatch.chdir(tmp_path)
    dense = tmp_path / "results/models/dense"
    dense.mkdir(parents=True)
    (dense / "config.json").write_text("{}\n")
    (dense / "model.safetensors").write_bytes(b"weights")
    write_manifest(dense)
    (tmp_path / "results/calibration").mkdir()
    (tmp_path / "results/calibration/gen.safetensors").write_bytes(b"stats")
    return tmp_path


ROWS = [row("results/models/dense", rule="train_tiny"), row("results/calibration/gen.safetensors", rule="calibrate")]


def mark(path):
    """Snakemake's marker of an output begun and not finished (.snakemake/incomplete/<base64>)."""
    marker = Path(".snakemake/incomplete") / base64.urlsafe_b64encode(path.encode()).decode()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def test_summary_rows_skip_other_lines():
    rows = records.summary_rows(summary(*ROWS, row("results/x.csv", "missing", "update pending"), "trailing log"))
    assert [r["output_file"] for r in rows] == [
        "results/models/dense",
        "results/calibration/gen.safetensors",
        "results/x.csv",
    ]
    with pytest.raises(ValueError, match="snakemake --summary"):
        records.summary_rows("Nothing to be done.\n")


def test_complete_run_is_recordable(workspace):
    assert records.refusal(records.summary_rows(summary(*ROWS))) is None


def test_missing_intermediate_is_named_with_the_rebuild_command(workspace):
    """The dense model deleted after its consumers were made: Snakemake plans nothing ('no update'),
    the check names it; an output a job is planned for is the dry run's business, not this one's."""
    shutil.rmtree("results/models/dense")
    rows = records.summary_rows(
        summary(
            row("results/models/dense", "missing", "no update", "train_tiny"),
            ROWS[1],
            row("results/tables/x.csv", "missing", "update pending"),
        )
    )
    line = records.refusal(rows, " --configfile workflow/config/micro.yaml")
    assert "\n" not in line and "1 output(s) the workflow expects are missing (results/models/dense)" in line
    assert line.endswith(
        "snakemake --cores all --configfile workflow/config/micro.yaml --forcerun results/models/dense"
    )
    assert "results/tables/x.csv" not in line


def test_missing_weights_inside_a_model_directory_are_named(workspace):
    Path("results/models/dense/model.safetensors").unlink()
    line = records.refusal(records.summary_rows(summary(*ROWS)))
    assert "results/models/dense/model.safetensors" in line and line.endswith("--forcerun results/models/dense")


def test_marker_of_an_existing_output_is_interrupted(workspace):
    mark("results/calibration/gen.safetensors")
    line = records.refusal(records.summary_rows(summary(*ROWS)), " --configfile c.yaml")
    assert "interrupted" in line and "results/calibration/gen.safetensors" in line
    assert line.endswith("snakemake --cores all --rerun-incomplete --configfile c.yaml")


def test_marker_of_a_missing_output_is_left_to_the_missing_check(workspace):
    """Snakemake ignores the marker of an output that does not exist (its --rerun-incomplete would
    not clear it): the refusal names the missing output and the command that does rebuild it."""
    shutil.rmtree("results/models/dense")
    mark("results/models/dense")
    rows = records.summary_rows(summary(row("results/models/dense", "missing", "no update"), ROWS[1]))
    line = records.refusal(rows)
    assert "--rerun-incomplete" not in line and "--forcerun results/models/dense" in line
    # ... and one outside this config's DAG that is gone is no reason at all
    mark("results/models/other")
    assert records.refusal(records.summary_rows(summary(*ROWS[1:]))) is None


def test_marker_of_a_planned_output_is_interrupted_and_combines_with_missing(workspace):
    """A job killed in a first run (its output never made, a job planned for it): --rerun-incomplete
    redoes it and clears its marker; with a stuck missing output too, one command does both."""
    mark("results/tables/x.csv")
    planned = row("results/tables/x.csv", "missing", "update pending")
    line = records.refusal(records.summary_rows(summary(*ROWS, planned)))
    assert "interrupted" in line and line.endswith("snakemake --cores all --rerun-incomplete")
    shutil.rmtree("results/models/dense")
    rows = records.summary_rows(summary(row("results/models/dense", "missing"), ROWS[1], planned))
    line = records.refusal(rows, " --configfile c.yaml")
    assert "interrupted" in line and "results/models/dense" in line
    assert line.endswith("snakemake --cores all --rerun-incomplete --configfile c.yaml --forcerun results/models/dense")


def test_marker_outside_the_dag_names_the_way_out(workspace):
    Path("results/other.json").write_text("{")
    mark("results/other.json")
    line = records.refusal(records.summary_rows(summary(*ROWS)))
    assert "outside this config's workflow" in line and "rm -rf results/other.json" in line


def test_leftover_temporaries_are_noted_not_recorded(workspace, capsys):
    left = Path("results/models/.dense.tmp-host-123-abcd")
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    aside = Path("results/calibration/.gen.safetensors.old-.gen.safetensors.tmp-host-9-x")
    aside.write_bytes(b"old")
    assert records.leftover_temporaries() == sorted([aside, left])
    Path("s.txt").write_text(summary(*ROWS))
    assert records.check("s.txt") == 0
    assert "2 temporary file(s) of killed writers are not recorded" in capsys.readouterr().err


def test_module_entry_point(workspace):
    shutil.rmtree("results/models/dense")
    Path("s.txt").write_text(summary(row("results/models/dense", "missing", "no update"), ROWS[1]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unisparse.records",
            "check",
            "--summary",
            "s.txt",
            "--config-args",
            " --configfile c.yaml",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout.count("\n") == 1 and "results/models/dense" in proc.stdout
    ok = subprocess.run(
        [sys.executable, "-m", "unisparse.records", "check", "--summary", "missing.txt"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 1 and "cannot check the run" in ok.stdout


@pytest.mark.skipif(not (Path(sys.executable).parent / "dvc").exists() and not shutil.which("dvc"), reason="needs dvc")
def test_dvcignore_keeps_temporaries_out(tmp_path):
    """DVC's own matcher (gitignore syntax) ignores what killed writers leave, at any depth, and not
    an artifact or Snakemake's directory timestamp."""
    shutil.copy(REPO / ".dvcignore", tmp_path / ".dvcignore")
    dvc = str(Path(sys.executable).parent / "dvc") if (Path(sys.executable).parent / "dvc").exists() else "dvc"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    ignored = [
        "results/models/.dense.tmp-host-1-ab",
        "results/models/.dense.tmp-host-1-ab/model.safetensors",
        "results/calibration/.gen.safetensors.tmp-x",
        "results/.tables.old-.tables.tmp-h-2-y-0",
        "results/checkpoints/tuned/dense",
    ]
    kept = [
        "results/models/dense/model.safetensors",
        "results/models/dense/.snakemake_timestamp",
        "results/calibration/gen.safetensors",
        "results/tmp-notes.txt",
        "results/models/dense.tmp",
    ]
    for path in ignored + kept:
        if not any(other.startswith(path + "/") for other in ignored + kept):  # a leaf: a file
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(b"x")
    proc = subprocess.run(
        [dvc, "check-ignore", *ignored, *kept], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert sorted(proc.stdout.split()) == sorted(ignored), proc.stdout + proc.stderr
