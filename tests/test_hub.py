"""The pinned checkpoint download (unisparse.hub, verb fetch-checkpoint, rule download_checkpoint),
offline: a local Hugging Face cache in huggingface_hub's own layout stands in for the Hub, so every
test runs without a network and with HF_HUB_OFFLINE=1 (the online side, lock-checkpoint and the
completion of a lock from the Hub's tree, is tests/test_local_hub.py)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.hub import (
    COMMIT,
    FILES,
    NAME,
    REPO_ID,
    blob_of,
    leftovers,
    run_verb,
    sha256,
    write_hf_cache,
    write_lock,
)
from helpers.workflow import MICRO, REPO, copy_workflow, snakemake
from unisparse import hub
from unisparse.choices import CHECKPOINT_SOURCES
from unisparse.config_checks import config_schema
from unisparse.io import IntegrityError


@pytest.fixture
def cache(tmp_path, offline):
    root = tmp_path / "hf" / "hub"
    write_hf_cache(root)
    return root


@pytest.fixture
def lock(tmp_path):
    return write_lock(tmp_path / "test.lock.json")


def check_fetched(out: Path) -> None:
    manifest = json.loads((out / hub.MANIFEST).read_text())
    assert manifest["repo_id"] == REPO_ID and manifest["revision"] == COMMIT
    names = {p.name for p in out.iterdir()} - {".snakemake_timestamp"}  # Snakemake's mark on directory outputs
    assert sorted(names) == sorted([*FILES, hub.MANIFEST])
    for name, data in FILES.items():
        assert not (out / name).is_symlink()
        assert sha256((out / name).read_bytes()) == sha256(data) == manifest["files"][name]["sha256"]
    assert hub.verify_checkpoint(out)["revision"] == COMMIT
    assert not leftovers(out)


def test_fake_cache_is_what_huggingface_hub_reads(tmp_path):
    """huggingface_hub's own cache scanner sees the fake cache as one complete, valid revision."""
    from huggingface_hub import scan_cache_dir

    write_hf_cache(tmp_path)
    info = scan_cache_dir(tmp_path)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    assert sorted(f.file_name for f in revision.files) == sorted(FILES)


def test_fetch_offline_links_and_verifies_every_file(tmp_path, cache, lock):
    out = tmp_path / "results" / "checkpoints" / NAME
    assert hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False) == out
    check_fetched(out)
    blob = blob_of(cache / f"models--{REPO_ID.replace('/', '--')}", "ema.safetensors")
    assert (out / "ema.safetensors").stat().st_ino == blob.stat().st_ino, "same file system: a hard link, no copy"
    hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)  # again: replaces it whole
    check_fetched(out)


def test_verb_fetches_offline_from_the_environment_cache(tmp_path, cache, lock):
    """HF_HUB_CACHE names the cache, HF_HUB_OFFLINE=1 keeps huggingface_hub off the network."""
    out = tmp_path / "ckpt" / NAME
    proc = run_verb("fetch-checkpoint", "--lock", str(lock), "--out", str(out), cache_root=cache)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    check_fetched(out)


@pytest.mark.slow
def test_snakemake_rule_downloads_the_locked_checkpoint(tmp_path, offline, monkeypatch):
    workdir = copy_workflow(tmp_path / "wf")
    root = workdir.parent / "hf"
    write_hf_cache(root / "hub")
    write_lock(workdir / "data" / "test.lock.json")
    config = yaml.safe_load((workdir / MICRO).read_text())
    config["checkpoint"] = {"source": "huggingface", "lock": "data/test.lock.json"}
    # a real checkpoint tunes only on real data: this study stops before tuning
    config["moe"].update(tunings=["none"], controls=[])
    (workdir / "hf.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("HF_HOME", str(root))  # the cache is HF_HOME/hub
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    snakemake(workdir, "--cores", "1", targets=[f"results/checkpoints/{NAME}"], config="hf.yaml")
    check_fetched(workdir / "results" / "checkpoints" / NAME)
    assert (workdir / "logs" / "benchmarks" / "download_checkpoint.tsv").is_file()

    # without the section (the tiny default) the rule does not exist
    dry = snakemake(workdir, "-n", "--cores", "1", targets=["download_checkpoint"], check=False)
    assert dry.returncode != 0 and "download_checkpoint" in dry.stdout + dry.stderr


@pytest.mark.parametrize("how", ["flipped byte", "truncated"])
def test_corrupted_cache_file_fails_naming_it(tmp_path, cache, lock, how):
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    blob = blob_of(repo, "ae.safetensors")
    data = bytearray(blob.read_bytes())
    if how == "flipped byte":
        data[1234] ^= 0x40
    else:
        del data[-10:]
    blob.write_bytes(bytes(data))
    out = tmp_path / "ckpt" / NAME
    with pytest.raises(IntegrityError) as err:
        hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    message = str(err.value)
    assert "ae.safetensors" in message and "ema.safetensors" not in message and str(blob) in message
    if how == "flipped byte":
        assert f"expected {sha256(FILES['ae.safetensors'])}, found {sha256(bytes(data))}" in message
    else:
        assert f"size expected {len(FILES['ae.safetensors'])} bytes, found {len(data)}" in message
    assert not out.exists() and not leftovers(out)

    proc = run_verb("fetch-checkpoint", "--lock", str(lock), "--out", str(out), cache_root=cache)
    assert proc.returncode == 2 and "ae.safetensors" in proc.stderr
    assert not out.exists() and not leftovers(out)


def test_failed_refetch_keeps_the_previous_directory(tmp_path, cache, lock):
    out = tmp_path / "ckpt" / NAME
    hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    blob = blob_of(cache / f"models--{REPO_ID.replace('/', '--')}", "vocab.json")
    swapped = blob.with_name("swapped")
    swapped.write_bytes(b'{"a": 1, "b": 0}\n')  # same size, other content; the old hard link keeps its bytes
    os.replace(swapped, blob)
    with pytest.raises(IntegrityError, match="vocab.json"):
        hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    check_fetched(out)


@pytest.mark.parametrize("tree", [True, False], ids=["with tree cache", "without tree cache"])
def test_missing_file_fails_naming_it(tmp_path, offline, lock, tree):
    """huggingface_hub >= 2.x notices the gap itself from its tree listing; without one (older caches)
    the snapshot folder comes back as it is and the fetch notices."""
    cache = tmp_path / "hub"
    repo = write_hf_cache(cache, tree=tree)
    blob = blob_of(repo, "tokenizer.json")
    (repo / "snapshots" / COMMIT / "tokenizer.json").unlink()
    blob.unlink()
    out = tmp_path / "ckpt" / NAME
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    assert not out.exists() and not leftovers(out)
    proc = run_verb("fetch-checkpoint", "--lock", str(lock), "--out", str(out), cache_root=cache)
    assert proc.returncode == 2 and "tokenizer.json" in proc.stderr, proc.stderr


def test_commit_not_in_cache_fails_offline(tmp_path, cache):
    other = write_lock(tmp_path / "other.lock.json", commit="f" * 40)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        hub.fetch_checkpoint(other, tmp_path / NAME, cache_dir=cache, progress=False)


def test_interrupted_verification_leaves_nothing(tmp_path, cache, lock, monkeypatch):
    calls = []
    real = hub.file_digests

    def interrupted(path, on_block=None):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, on_block)

    monkeypatch.setattr(hub, "file_digests", interrupted)
    out = tmp_path / "ckpt" / NAME
    with pytest.raises(KeyboardInterrupt):
        hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    assert len(calls) == 3
    assert not out.exists() and not leftovers(out)


def test_killed_fetch_leaves_nothing_and_its_leftover_is_discarded(tmp_path, cache, lock):
    """SIGKILL mid-verification: no cleanup runs, the temporary directory stays behind, nothing is
    under the final name; the next fetch discards the leftover and does not use it."""
    out = tmp_path / "ckpt" / NAME
    marker = tmp_path / "verifying"
    child = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import unisparse.hub as hub\n"
        "def stuck(path, on_block=None):\n"
        "    Path(sys.argv[4]).touch()\n"
        "    time.sleep(120)\n"
        "hub.file_digests = stuck\n"
        "hub.fetch_checkpoint(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], progress=False)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(lock), str(out), str(cache), str(marker)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the fetch ended before verifying"
            assert time.monotonic() < deadline, "the fetch never reached verification"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    (leftover,) = leftovers(out)
    assert (leftover / "ema.safetensors").is_file()
    (leftover / "ema.safetensors").unlink()
    (leftover / "ema.safetensors").write_bytes(b"stale partial content")

    hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    check_fetched(out)
    assert not leftover.exists()


def test_unfilled_lock_is_refused_naming_the_command(tmp_path, cache):
    unfilled = {"repo_id": REPO_ID, "revision": None, "files": {n: {"sha256": None, "size": None} for n in FILES}}
    path = tmp_path / "bagel.lock.json"
    path.write_text(json.dumps(unfilled))
    out = tmp_path / NAME
    with pytest.raises(hub.LockError) as err:
        hub.fetch_checkpoint(path, out, cache_dir=cache, progress=False)
    assert f"unisparse lock-checkpoint --repo-id {REPO_ID} --revision main --out {path}" in str(err.value)
    assert "revision" in str(err.value) and "ema.safetensors" in str(err.value)
    proc = run_verb("fetch-checkpoint", "--lock", str(path), "--out", str(out), cache_root=cache)
    assert proc.returncode == 2 and "unisparse lock-checkpoint" in proc.stderr
    assert not out.exists()


def test_a_commit_alone_is_completed_offline_only_from_the_cached_tree(tmp_path, offline):
    """Offline, a lock with a commit but no digests is completed from the tree listing huggingface_hub
    cached with that commit's download; a cache without one (an older huggingface_hub) cannot, and the
    refusal names the command that writes the lock."""
    unfilled = {"repo_id": REPO_ID, "revision": COMMIT, "files": {n: {"sha256": None, "size": None} for n in FILES}}
    path = tmp_path / "bagel.lock.json"
    path.write_text(json.dumps(unfilled))
    bare = tmp_path / "bare" / "hub"
    write_hf_cache(bare, tree=False)
    with pytest.raises(hub.LockError, match=f"--revision {COMMIT}"):
        hub.fetch_checkpoint(path, tmp_path / NAME, cache_dir=bare, progress=False)
    assert not (tmp_path / NAME).exists()

    listed = tmp_path / "listed" / "hub"
    write_hf_cache(listed)
    hub.fetch_checkpoint(path, tmp_path / NAME, cache_dir=listed, progress=False)
    check_fetched(tmp_path / NAME)
    manifest = json.loads((tmp_path / NAME / hub.MANIFEST).read_text())
    assert manifest["verified"]["ema.safetensors"] == ["sha256"] and manifest["verified"]["vocab.json"] == ["git_sha1"]
    kinds = {n: "sha256" if n.endswith(".safetensors") else "git_sha1" for n in FILES}  # LFS files: sha256
    assert set(manifest["completed_from_hub"]) == {f"{n}.{k}" for n in FILES for k in ("size", kinds[n])}


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda lock: lock.__setitem__("revision", "main"), "revision"),
        (lambda lock: lock["files"]["ema.safetensors"].__setitem__("sha256", "ABC"), "ema.safetensors"),
        (lambda lock: lock["files"].__setitem__("../escape.json", {"sha256": None, "size": None}), "escape"),
        (lambda lock: lock["files"].__setitem__("*.safetensors", {"sha256": None, "size": None}), "*.safetensors"),
        (lambda lock: lock.__setitem__("revison", COMMIT), "revison"),
        (lambda lock: lock.__setitem__("files", {}), "files"),
    ],
)
def test_malformed_lock_is_refused(tmp_path, lock, edit, key):
    data = json.loads(lock.read_text())
    edit(data)
    lock.write_text(json.dumps(data))
    with pytest.raises(hub.LockError) as err:
        hub.read_lock(lock, complete=False)
    assert key in str(err.value)


def test_shipped_bagel_lock():
    """data/bagel-7b-mot.lock.json pins BAGEL-7B-MoT's files at one commit; the digests it lacks are
    completed at fetch time from the Hub's tree at that commit (tests/test_local_hub.py)."""
    path = REPO / "data" / "bagel-7b-mot.lock.json"
    lock = hub.read_lock(path, complete=False)
    assert lock["repo_id"] == REPO_ID and hub.checkpoint_name(lock["repo_id"]) == NAME
    assert set(FILES) - {"preprocessor_config.json"} <= set(lock["files"])
    assert lock["revision"] is not None and not hub.is_complete(lock)


def test_schema_states_the_checkpoint_sources():
    schema = config_schema(REPO / "workflow/schemas/config.schema.yaml")
    section = schema["properties"]["checkpoint"]
    assert tuple(section["properties"]["source"]["enum"]) == CHECKPOINT_SOURCES
    assert section["additionalProperties"] is False
