"""Fixtures shared by the test modules (their helpers are in tests/helpers/)."""

import os
import shutil
from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")  # their asserts explain a failure as a test's own do

from helpers.models import make_model  # noqa: E402
from helpers.workflow import copy_workflow, snakemake  # noqa: E402


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process and its children; huggingface_hub read the variable at import,
    so its constant is set too: any request the code makes raises instead of reaching the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """A directory in which the whole micro pipeline (figures included) has run once (about 1.5 minutes
    on two cores), for every test that needs pipeline outputs. Set UNISPARSE_MICRO_RUN=<dir of a
    finished micro run> to start from a copy of that run instead: Snakemake then reruns only what is
    out of date."""
    workdir = tmp_path_factory.mktemp("micro_run")
    previous = os.environ.get("UNISPARSE_MICRO_RUN")
    if previous:
        for name in ("results", "logs", ".snakemake"):
            if (Path(previous) / name).is_dir():
                shutil.copytree(
                    Path(previous) / name,
                    workdir / name,
                    symlinks=True,
                    ignore=shutil.ignore_patterns("locks", "incomplete"),
                )
    copy_workflow(workdir)
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A local Hub on 127.0.0.1 (tests/helpers/local_hub.py) that this process's huggingface_hub and
    its children talk to, online, with a fresh cache under ``tmp_path``; stopped after the test."""
    from helpers.local_hub import LocalHub, point_client_at

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with LocalHub() as hub:
        point_client_at(monkeypatch, hub.endpoint)
        yield hub
