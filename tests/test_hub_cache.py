"""The Hugging Face cache is trusted only for its own bytes, and a lock names each file once.

A snapshot entry (``snapshots/<commit>/<file>``) is used only if it resolves to a regular file in
the repository's own ``blobs/`` (or is a regular file in place, huggingface_hub's layout without
symlinks); anything else is refused naming the entry, before anything is linked or copied, and no
advice ever names a file outside the cache. The names of the manifests are reserved, and two
spellings of one file in a lock are refused naming both. Offline, on the fake cache of
tests/helpers/hub.py.
"""

import json
import os
from pathlib import Path

import pytest

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
from unisparse import hub
from unisparse.io import IntegrityError

REPO_DIR = "models--" + REPO_ID.replace("/", "--")
VICTIM = "vocab.json"  # a plain git file (a small one)


@pytest.fixture
def cache(tmp_path, offline):
    root = tmp_path / "hf" / "hub"
    write_hf_cache(root)
    return root


@pytest.fixture
def lock(tmp_path):
    return write_lock(tmp_path / "test.lock.json")


def entry(cache, name=VICTIM) -> Path:
    return cache / REPO_DIR / "snapshots" / COMMIT / name


def relink(link: Path, target) -> None:
    link.unlink()
    link.symlink_to(target)


def outside_file(tmp_path, data) -> Path:
    path = tmp_path / "elsewhere" / "system-file"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def inodes_under(root: Path) -> set:
    """(device, inode) of every file under ``root``, links not followed."""
    found = set()
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            st = os.lstat(os.path.join(dirpath, n))
            found.add((st.st_dev, st.st_ino))
    return found


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def assert_refused_untouched(tmp_path, cache, lock, outside: Path, out: Path):
    """The fetch is refused naming the entry, by the function and by the verb (exit 2, one line), and
    the outside file keeps its link count and is linked from nowhere under the destination."""
    before, data = os.stat(outside), outside.read_bytes()
    with pytest.raises(IntegrityError) as err:
        hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    message = str(err.value)
    assert "\n" not in message and str(entry(cache)) in message and "nothing was linked or copied" in message
    assert "delete" not in message.lower(), "never advise deleting anything, least of all outside the cache"
    assert not out.exists() and not leftovers(out)
    proc = run_verb("fetch-checkpoint", "--lock", str(lock), "--out", str(out), cache_root=cache)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("unisparse fetch-checkpoint: error:") and str(entry(cache)) in line
    after = os.stat(outside)
    assert (after.st_nlink, after.st_ino, after.st_mtime_ns) == (before.st_nlink, before.st_ino, before.st_mtime_ns)
    assert outside.read_bytes() == data
    assert (after.st_dev, after.st_ino) not in inodes_under(out.parent)
    return message


@pytest.mark.parametrize("bytes_", ["right bytes", "wrong bytes"])
@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_link_out_of_the_cache_is_refused(tmp_path, cache, lock, bytes_, how):
    data = FILES[VICTIM] if bytes_ == "right bytes" else b'{"a": 1, "b": 0}\n'
    outside = outside_file(tmp_path, data)
    link = entry(cache)
    relink(link, outside if how == "absolute" else os.path.relpath(outside, link.parent))
    message = assert_refused_untouched(tmp_path, cache, lock, outside, tmp_path / "results" / "checkpoints" / NAME)
    assert f"{link} -> {outside}" in message


def test_link_into_another_repositorys_blobs_is_refused(tmp_path, cache, lock):
    other = cache / "models--someone--else" / "blobs" / ("f" * 40)
    other.parent.mkdir(parents=True)
    other.write_bytes(FILES[VICTIM])
    relink(entry(cache), os.path.relpath(other, entry(cache).parent))
    assert_refused_untouched(tmp_path, cache, lock, other, tmp_path / "out" / NAME)


def test_linked_blobs_folder_is_refused(tmp_path, cache, lock):
    """blobs/ itself a link elsewhere: every entry resolves outside the cache."""
    blobs = cache / REPO_DIR / "blobs"
    moved = tmp_path / "elsewhere" / "blobs"
    moved.parent.mkdir(parents=True)
    blobs.rename(moved)
    blobs.symlink_to(moved)
    outside = moved / blob_of(cache / REPO_DIR, VICTIM).name
    with pytest.raises(IntegrityError, match="nothing was linked or copied") as err:
        hub.fetch_checkpoint(lock, tmp_path / "out" / NAME, cache_dir=cache, progress=False)
    assert str(entry(cache)) in str(err.value) and os.stat(outside).st_nlink == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_link_to_a_link_into_the_blobs_is_used(tmp_path, cache, lock):
    """Where a chain of links ends is what counts: in the repository's blobs, it is the cache's file."""
    second = cache / REPO_DIR / "snapshots" / ("e" * 40) / VICTIM
    second.parent.mkdir(parents=True)
    second.symlink_to(os.path.relpath(blob_of(cache / REPO_DIR, VICTIM), second.parent))
    relink(entry(cache), os.path.relpath(second, entry(cache).parent))
    out = tmp_path / "out" / NAME
    hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    assert (out / VICTIM).stat().st_ino == blob_of(cache / REPO_DIR, VICTIM).stat().st_ino


@pytest.mark.parametrize("bytes_", ["right bytes", "wrong bytes"])
def test_regular_file_in_the_snapshot_is_the_caches_own(tmp_path, cache, lock, bytes_):
    """huggingface_hub puts the file itself into snapshots/ where the file system has no symlinks: it
    lies in the cache and is used; wrong bytes are named with advice to delete that cache file only."""
    link = entry(cache)
    link.unlink()
    data = FILES[VICTIM] if bytes_ == "right bytes" else b'{"a": 1, "b": 0}\n'
    link.write_bytes(data)
    out = tmp_path / "out" / NAME
    if bytes_ == "right bytes":
        hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
        assert (out / VICTIM).read_bytes() == data
        return
    with pytest.raises(IntegrityError) as err:
        hub.fetch_checkpoint(lock, out, cache_dir=cache, progress=False)
    assert f"its bytes: {link} in the Hugging Face cache; delete that cache file" in str(err.value)
    assert not out.exists()


def test_wrong_blob_advice_names_only_cache_files(tmp_path, cache, lock):
    blob = blob_of(cache / REPO_DIR, VICTIM)
    blob.write_bytes(b'{"a": 1, "b": 0}\n')
    with pytest.raises(IntegrityError) as err:
        hub.fetch_checkpoint(lock, tmp_path / "out" / NAME, cache_dir=cache, progress=False)
    assert f"delete that blob and its link {entry(cache)}" in str(err.value) and str(blob) in str(err.value)


def lock_with(tmp_path, names_and_data) -> Path:
    """A lock (text, so that duplicate keys survive) of ``(name, data)`` pairs, in order."""
    body = ", ".join(f'{json.dumps(n)}: {{"sha256": "{sha256(d)}", "size": {len(d)}}}' for n, d in names_and_data)
    path = tmp_path / "hand.lock.json"
    path.write_text(f'{{"repo_id": "{REPO_ID}", "revision": "{COMMIT}", "files": {{{body}}}}}')
    return path


@pytest.fixture
def no_fetch(monkeypatch):
    """Any attempt to reach the cache (or the Hub) fails the test: refusals come before it."""

    def fetched(*args, **kwargs):
        raise AssertionError("the snapshot was asked for")

    monkeypatch.setattr(hub, "_snapshot", fetched)


@pytest.mark.parametrize("reserved", ["checkpoint.json", "SHA256SUMS", "text_encoder/SHA256SUMS"])
def test_reserved_name_in_a_lock_is_refused_before_fetching(tmp_path, cache, no_fetch, reserved):
    path = lock_with(tmp_path, [*FILES.items(), (reserved, b"{}\n")])
    out = tmp_path / "out" / NAME
    with pytest.raises(hub.LockError, match="is reserved") as err:
        hub.fetch_checkpoint(path, out, cache_dir=cache, progress=False)
    assert repr(reserved) in str(err.value) and "\n" not in str(err.value)
    proc = run_verb("fetch-checkpoint", "--lock", str(path), "--out", str(out), cache_root=cache)
    assert proc.returncode == 2 and reserved in one_line(proc.stderr)
    assert not out.exists()
    with pytest.raises(hub.LockError, match="is reserved"):
        hub.lock_checkpoint(REPO_ID, COMMIT, [*FILES, reserved], tmp_path / "x.lock.json")


@pytest.mark.parametrize(
    "spelling, plain",
    [
        ("./config.json", "config.json"),
        ("config.json/", "config.json"),
        ("/config.json", "config.json"),
        ("text_encoder//config.json", "text_encoder/config.json"),
        ("text_encoder/./config.json", "text_encoder/config.json"),
        ("text_encoder\\config.json", "text_encoder/config.json"),
    ],
)
def test_two_spellings_of_one_file_are_refused_naming_both(tmp_path, cache, no_fetch, spelling, plain):
    data = FILES["config.json"]
    path = lock_with(tmp_path, [*FILES.items(), *([(plain, data)] if plain not in FILES else []), (spelling, data)])
    out = tmp_path / "out" / NAME
    with pytest.raises(hub.LockError, match="twice") as err:
        hub.fetch_checkpoint(path, out, cache_dir=cache, progress=False)
    assert repr(plain) in str(err.value) and repr(spelling) in str(err.value)
    proc = run_verb("fetch-checkpoint", "--lock", str(path), "--out", str(out), cache_root=cache)
    assert proc.returncode == 2 and "twice" in one_line(proc.stderr) and "SameFileError" not in proc.stderr
    assert not out.exists()

    # alone, the other spelling is refused too: a lock names each file in its one plain form
    alone = lock_with(tmp_path, [*((n, d) for n, d in FILES.items() if n != plain), (spelling, data)])
    with pytest.raises(hub.LockError, match="plain relative path"):
        hub.read_lock(alone, complete=False)


def test_duplicate_key_in_a_lock_is_refused(tmp_path, no_fetch):
    path = lock_with(tmp_path, [*FILES.items(), ("vocab.json", b"other\n")])
    with pytest.raises(hub.LockError, match="'vocab.json' appears twice"):
        hub.read_lock(path)


@pytest.mark.parametrize("key", ["revision", "repo_id", "sha256", "file"])
def test_a_trailing_newline_in_a_lock_value_is_refused(tmp_path, key):
    """Patterns match the whole value: ``$`` alone would let ``<commit>\\n`` through."""
    from unisparse.hub import LockError, read_lock

    path = write_lock(tmp_path / "lock.json")
    lock = json.loads(path.read_text())
    name = next(iter(lock["files"]))
    if key == "revision":
        lock["revision"] += "\n"
    elif key == "repo_id":
        lock["repo_id"] += "\n"
    elif key == "sha256":
        lock["files"][name]["sha256"] += "\n"
    else:
        lock["files"][name + "\n"] = lock["files"].pop(name)
    path.write_text(json.dumps(lock))
    with pytest.raises(LockError):
        read_lock(path)
