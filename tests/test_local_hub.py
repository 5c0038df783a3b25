"""Locks against the local Hub (tests/helpers/local_hub.py), through the real huggingface_hub client:
a lock is written from the Hub's tree listing without downloading; a lock that pins a commit but lacks
digests (as the shipped BAGEL lock does) is completed from that tree at fetch time and the manifest
records every digest verified; bytes that differ from a digest, the lock's or the tree's, are refused
naming the file, the expected and the found digest, and nothing lands under the final path."""

import json
from pathlib import Path

import pytest

from helpers.hub import FILES, NAME, REPO_ID, git_blob_id, leftovers, sha256
from helpers.workflow import REPO
from unisparse import hub
from unisparse.io import IntegrityError

LFS = ("ae.safetensors", "ema.safetensors")


def expected_entry(name: str) -> dict:
    data = FILES[name]
    if name in LFS:
        return {"size": len(data), "sha256": sha256(data)}
    return {"size": len(data), "git_sha1": git_blob_id(data)}


@pytest.fixture
def bagel(local_hub):
    return local_hub.add(REPO_ID, FILES)


def write(path, lock: dict):
    path.write_text(json.dumps(lock, indent=2))
    return path


def shipped_shape(commit: str) -> dict:
    """A lock as data/bagel-7b-mot.lock.json is shipped: a commit, digests for the LFS files only."""
    files = {n: expected_entry(n) if n in LFS else {"sha256": None, "size": None} for n in FILES}
    return {"repo_id": REPO_ID, "revision": commit, "files": files}


def test_lock_is_written_from_the_tree_without_downloading(tmp_path, local_hub, bagel):
    out_lock = tmp_path / "data" / "bagel.lock.json"
    lock = hub.lock_checkpoint(REPO_ID, "main", sorted(FILES), out_lock)
    assert local_hub.count("/resolve/") == 0
    assert lock == json.loads(out_lock.read_text())
    assert lock["revision"] == bagel.commit and lock["repo_type"] == "model"
    assert lock["files"] == {n: expected_entry(n) for n in FILES}

    hub.fetch_checkpoint(out_lock, tmp_path / NAME, progress=False)
    manifest = json.loads((tmp_path / NAME / hub.MANIFEST).read_text())
    assert manifest["completed_from_hub"] == [] and manifest["revision"] == bagel.commit
    assert {n: manifest["files"][n]["sha256"] for n in FILES} == {n: sha256(d) for n, d in FILES.items()}

    # the verb: repository, kind and files default to the existing lock's; same commit, same lock
    from unisparse.cli import main

    main(["--no-progress", "lock-checkpoint", "--revision", bagel.commit, "--out", str(out_lock)])
    assert json.loads(out_lock.read_text()) == lock


def test_a_lock_shaped_like_the_shipped_one_is_completed_and_recorded(tmp_path, local_hub, bagel):
    path = write(tmp_path / "bagel.lock.json", shipped_shape(bagel.commit))
    out = tmp_path / "ckpt" / NAME
    hub.fetch_checkpoint(path, out, progress=False)
    manifest = json.loads((out / hub.MANIFEST).read_text())
    filled = {f"{n}.{k}" for n in FILES if n not in LFS for k in ("size", "git_sha1")}
    assert set(manifest["completed_from_hub"]) == filled
    assert manifest["verified"] == {n: ["sha256"] if n in LFS else ["git_sha1"] for n in FILES}
    for name, data in FILES.items():
        assert (out / name).read_bytes() == data
        assert manifest["files"][name] == {"size": len(data), "sha256": sha256(data), "git_sha1": git_blob_id(data)}
    assert hub.verify_checkpoint(out)["revision"] == bagel.commit


@pytest.mark.parametrize("name", ["ema.safetensors", "config.json"])
@pytest.mark.parametrize("digest_in", ["lock", "tree"])
def test_served_bytes_that_differ_from_a_digest_are_refused(tmp_path, local_hub, bagel, name, digest_in):
    """A corrupted mirror (same size, one byte flipped): the digest it contradicts is the lock's own
    (a complete lock) or the one the fetch took from the tree (the shipped shape)."""
    lock = {"repo_id": REPO_ID, "revision": bagel.commit, "files": {n: expected_entry(n) for n in FILES}}
    if digest_in == "tree":
        lock = shipped_shape(bagel.commit)
        if name in LFS:
            lock["files"][name] = {"sha256": None, "size": None}
    path = write(tmp_path / "bagel.lock.json", lock)
    bad = bytearray(FILES[name])
    bad[len(bad) // 2] ^= 0x20
    local_hub.tamper(REPO_ID, name, bytes(bad))
    out = tmp_path / "ckpt" / NAME
    with pytest.raises(IntegrityError) as err:
        hub.fetch_checkpoint(path, out, progress=False)
    key = "sha256" if name in LFS else "git_sha1"
    found = sha256(bytes(bad)) if name in LFS else git_blob_id(bytes(bad))
    assert f"{name}: {key} expected {expected_entry(name)[key]}, found {found}" in str(err.value)
    assert not out.exists() and not leftovers(out)


def test_a_locked_digest_the_hub_contradicts_is_refused_before_downloading(tmp_path, local_hub, bagel):
    lock = shipped_shape(bagel.commit)
    lock["files"]["ema.safetensors"]["sha256"] = "a" * 64
    lock["files"]["vocab.json"] = {"size": None, "git_sha1": "b" * 40}
    path = write(tmp_path / "bagel.lock.json", lock)
    with pytest.raises(IntegrityError) as err:
        hub.fetch_checkpoint(path, tmp_path / NAME, progress=False)
    message = str(err.value)
    assert f"ema.safetensors: sha256 locked {'a' * 64}, the Hub states {sha256(FILES['ema.safetensors'])}" in message
    assert f"vocab.json: git_sha1 locked {'b' * 40}, the Hub states {git_blob_id(FILES['vocab.json'])}" in message
    assert local_hub.count("/resolve/") == 0 and not (tmp_path / NAME).exists()


def test_a_locked_file_the_commit_lacks_is_named(tmp_path, local_hub, bagel):
    lock = shipped_shape(bagel.commit)
    lock["files"]["missing.json"] = {"sha256": None, "size": None}
    with pytest.raises(FileNotFoundError, match="missing.json"):
        hub.fetch_checkpoint(write(tmp_path / "x.lock.json", lock), tmp_path / NAME, progress=False)


def test_lock_refuses_to_change_a_recorded_value(tmp_path, local_hub, bagel):
    """A lock that records a value for the same commit (one taken from a published source) is checked
    against the Hub, not overwritten; its note is kept when the Hub agrees."""
    recorded = shipped_shape(bagel.commit)
    recorded["files"]["ae.safetensors"]["sha256"] = "b" * 64
    path = write(tmp_path / "recorded.lock.json", recorded)
    with pytest.raises(IntegrityError, match="ae.safetensors: .* records sha256 b{64} for this commit"):
        hub.lock_checkpoint(REPO_ID, bagel.commit, sorted(FILES), path)
    assert json.loads(path.read_text()) == recorded

    agreeing = {**shipped_shape(bagel.commit), "note": "the two LFS sums are published"}
    lock = hub.lock_checkpoint(REPO_ID, "main", sorted(FILES), write(path, agreeing))
    assert lock["note"] == agreeing["note"] and lock["files"] == {n: expected_entry(n) for n in FILES}


def test_lock_needs_the_hub(tmp_path, local_hub, bagel, offline):
    with pytest.raises(hub.LockError, match="HF_HUB_OFFLINE"):
        hub.lock_checkpoint(REPO_ID, "main", sorted(FILES), tmp_path / "x.lock.json")
    assert local_hub.count() == 0


def test_a_dataset_is_locked_and_fetched(tmp_path, local_hub):
    files = {"data/part-0.tar": b"tar bytes " * 100, "README.md": b"# a dataset\n"}
    repo = local_hub.add("someone/t2i", files, repo_type="dataset")
    path = tmp_path / "t2i.lock.json"
    lock = hub.lock_checkpoint("someone/t2i", "main", sorted(files), path, repo_type="dataset")
    assert lock["repo_type"] == "dataset" and set(lock["files"]["data/part-0.tar"]) == {"size", "sha256"}
    hub.fetch_checkpoint(path, tmp_path / "t2i", progress=False)
    assert (tmp_path / "t2i" / "data/part-0.tar").read_bytes() == files["data/part-0.tar"]
    with pytest.raises(hub.LockError, match="cannot resolve model someone/t2i@main"):
        hub.lock_checkpoint("someone/t2i", "main", ["README.md"], tmp_path / "m.lock.json")  # a model by default
    assert repo.commit == lock["revision"]


def test_shipped_locks_pass_the_structural_checks():
    """Every lock under data/ reads, names its kind, and each file states its size and a digest or
    leaves them null for the fetch to complete from the tree at the lock's commit. The checkpoint's
    and the tuning data's (the paper DAG's first jobs) pin a commit; a lock no public source gave a
    commit for says so ("Unpinned:") and names the command that pins it, which its download asks for."""
    paths = sorted((REPO / "data").glob("*.lock.json"))
    assert len(paths) >= 7
    for path in paths:
        lock = hub.read_lock(path, complete=False)
        assert lock["repo_type"] in hub.REPO_TYPES
        for name, entry in lock["files"].items():
            assert "size" in entry and set(entry) & set(hub.DIGESTS), (path, name)
        if lock["revision"] is None:
            assert (
                lock["note"].startswith("Unpinned:")
                and f"lock-checkpoint --revision main --out data/{path.name}" in lock["note"]
            )
    for name in ("bagel-7b-mot", "qwen-image", "text-to-image-2m", "clip-vit-large-patch14", "mme"):
        assert hub.read_lock(REPO / "data" / f"{name}.lock.json", complete=False)["revision"] is not None


def test_an_input_is_fetched_into_the_cache_listed_by_pattern_and_read_offline(tmp_path, local_hub, monkeypatch):
    """`fetch-input`: a dataset whose shards are listed by pattern is downloaded into the cache at
    the locked commit, verified there, and described by a manifest; offline, the cache then serves
    exactly that commit (what the evaluation jobs read)."""
    files = {
        "data/test-00000-of-00002.parquet": b"shard zero " * 50,
        "data/test-00001-of-00002.parquet": b"shard one " * 50,
        "data/val-00000-of-00001.parquet": b"not locked",
        "README.md": b"# MME\n",
    }
    repo = local_hub.add("lmms-lab/MME", files, repo_type="dataset")
    lock = {"repo_id": "lmms-lab/MME", "repo_type": "dataset", "revision": repo.commit}
    path = write(tmp_path / "mme.lock.json", {**lock, "files": {}, "patterns": ["data/test-*.parquet"]})
    manifest = hub.fetch_input(path, tmp_path / "inputs" / "mme.json", progress=False)
    shards = sorted(n for n in files if n.startswith("data/test-"))
    assert sorted(manifest["files"]) == shards and manifest["revision"] == repo.commit
    assert json.loads((tmp_path / "inputs" / "mme.json").read_text()) == manifest
    assert {f"{n} (matches data/test-*.parquet)" for n in shards} <= set(manifest["completed_from_hub"])
    assert local_hub.count("val-00000") == 0

    # the lock verb writes the matches out and keeps the pattern for the next lock
    written = hub.lock_checkpoint(
        "lmms-lab/MME", "main", [], tmp_path / "relocked.json", repo_type="dataset", patterns=["data/test-*"]
    )
    assert sorted(written["files"]) == shards and written["patterns"] == ["data/test-*"]

    from unisparse.evaluate.mme import dataset_snapshot  # what the evaluation job reads through

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    before = local_hub.count()
    folder = dataset_snapshot("lmms-lab/MME", manifest["revision"], ["data/test-*.parquet"])
    assert (Path(folder) / shards[0]).read_bytes() == files[shards[0]] and local_hub.count() == before


def test_a_lock_without_a_commit_is_refused_naming_the_command(tmp_path, local_hub, bagel):
    path = write(tmp_path / "pope.lock.json", {"repo_id": REPO_ID, "revision": None, "files": {}, "patterns": ["*"]})
    with pytest.raises(hub.LockError, match="unisparse lock-checkpoint") as err:
        hub.fetch_input(path, tmp_path / "pope.json", progress=False)
    assert "revision" in str(err.value) and local_hub.count() == 0 and not (tmp_path / "pope.json").exists()
