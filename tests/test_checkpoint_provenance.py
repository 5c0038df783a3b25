"""Kill, change, rerun (issue 8, item 2): a tuning checkpoint left by an interrupted run is not
resumed once the model it was made from has changed, and the rerun ends byte-identical to a clean run
of the changed config.

On the micro config with a longer router-only tuning (so the run can be interrupted while it tunes):
run until the first checkpoint exists, interrupt Snakemake as a user would (SIGINT), change
`train.steps` (so the dense model, the partition and the tuning input all change), rerun with
`--rerun-incomplete`, and compare with a clean run of the changed config in another directory.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.workflow import BIN, copy_workflow, interruptible, snakemake, write_config

pytestmark = pytest.mark.slow  # drives Snakemake (or DVC) in subprocesses: outside the fast inner loop

MOE = "moe/gen/E4-k2-snake-paper-s0"
TARGET = f"results/models/{MOE}/frozen"
CHECKPOINT = Path(f"results/checkpoints/{MOE}/frozen/last/meta.json")


def provenance_config(workdir: Path, train_steps: int) -> str:
    """micro.yaml with `train_steps` and a longer router-only tuning that checkpoints often."""

    def edit(config):
        config["train"]["steps"] = train_steps
        config["moe"]["tune"]["frozen"].update(steps=400, batch_gen=2, checkpoint_every=5)

    return write_config(workdir, edit, "workflow/config/provenance.yaml")


def interrupt_when_checkpointed(workdir: Path, config: str, timeout: float = 300) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), TARGET, "--configfile", config, "--cores", "2"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=interruptible,
    )
    deadline = time.time() + timeout
    try:
        while not (workdir / CHECKPOINT).exists():
            assert proc.poll() is None, "the run ended before it wrote a checkpoint"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)


def model_files(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_kill_change_rerun_equals_clean_run_of_changed_config(tmp_path):
    killed = copy_workflow(tmp_path / "killed")
    interrupt_when_checkpointed(killed, provenance_config(killed, train_steps=40))
    assert (killed / CHECKPOINT).exists() and not (killed / TARGET).exists()

    changed = provenance_config(killed, train_steps=41)
    snakemake(killed, "--cores", "2", "--rerun-incomplete", targets=[TARGET], config=changed)
    log = (killed / f"logs/{MOE}/frozen.log").read_text()
    assert "not resuming from checkpoint" in log and "another input model" in log, log[-2000:]

    clean = copy_workflow(tmp_path / "clean")
    snakemake(clean, "--cores", "2", targets=[TARGET], config=provenance_config(clean, train_steps=41))
    for part in ("dense", f"{MOE}/none", f"{MOE}/frozen"):
        got, want = model_files(killed / f"results/models/{part}"), model_files(clean / f"results/models/{part}")
        assert got.keys() == want.keys() and {"model.safetensors", "SHA256SUMS"} <= got.keys()
        assert [f for f in want if got[f] != want[f]] == [], part
