"""An outside input from the Hugging Face Hub, pinned: one commit, every file's digest kept in git.

A Hub branch moves and a 30 GB download can be cut short or altered on the way (huggingface_hub checks
only the size of what it fetched), so the pipeline never downloads "the latest" of anything: a lock
file (``data/<name>.lock.json``) names the repository, its kind (model or dataset), the commit and, per
file, its size and digest: the sha256 for an LFS file, the git blob id (``git_sha1``) for a plain git
file, the only digest the Hub states for one (a small JSON config, a tokenizer). That file list is also
the download's allow-list (one source of truth: what is locked is what is fetched, nothing else).

``lock_checkpoint`` writes a lock from the Hub's tree listing at a commit, downloading nothing. A lock
that pins a commit but lacks some digests is completed by ``fetch_checkpoint`` from the tree at that
commit (a digest the lock states and the Hub contradicts is refused, naming the file); the fetch then
hashes every downloaded file, checks each digest, and only then lets the directory appear under its
final name, with a manifest recording every digest it verified and where each came from.

The Hub client is imported inside the functions, so this module stays importable (by the workflow's
DAG build) without it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from .io import MANIFEST as MODEL_MANIFEST
from .io import IntegrityError, atomic_path, file_digests, write_json

log = logging.getLogger(__name__)

#: the manifest a fetched directory carries: repository, commit and the verified sums
MANIFEST = "checkpoint.json"
#: names a lock may not list: the fetch writes ``checkpoint.json`` over whatever had that name, and
#: ``SHA256SUMS`` (at any depth) is what the loaders verify a model directory against, never a file of it
RESERVED_TOP = (MANIFEST,)
RESERVED_ANY_DEPTH = (MODEL_MANIFEST,)
#: ``note`` is free text for people (where the values came from); the code ignores it
#: ``patterns`` (optional) lists files by glob where their names are not known ahead (a dataset's
#: parquet shards): the fetch adds the files of the pinned commit's tree that match, each completed
#: and verified as a listed one
LOCK_KEYS = ("repo_id", "repo_type", "revision", "files", "patterns", "note")
#: what a lock may pin: a model repository (the default) or a dataset repository
REPO_TYPES = ("model", "dataset")
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: the digests a lock entry may state, with their lengths in hex digits: sha256 (any file; the Hub
#: states it for LFS files) and the git blob id (the Hub states it for plain git files)
DIGESTS = {"sha256": 64, "git_sha1": 40}
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# file names reach allow_patterns (fnmatch) and the file system: no glob characters, no escape
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_PATTERN = re.compile(r"[A-Za-z0-9_.*?-]+(/[A-Za-z0-9_.*?-]+)*")


class LockError(ValueError):
    """A lock file that cannot pin a download (malformed, or not filled in yet)."""


def lock_command(lock_path, repo_id: str | None = None, revision: str | None = None) -> str:
    """The command that (re)writes ``lock_path`` from a trusted download (quoted for a shell)."""
    import shlex

    parts = ["unisparse", "lock-checkpoint"]
    if repo_id:
        parts += ["--repo-id", repo_id]
    parts += ["--revision", revision or "main", "--out", str(lock_path)]
    return " ".join(shlex.quote(p) for p in parts)


def read_lock(path, complete: bool = True) -> dict:
    """The lock at ``path``, checked. ``complete``: also refuse a lock whose commit or sums are not
    filled in (``null``), naming the command that fills them; never guess a missing value."""
    path = Path(path)
    try:
        lock = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such lock file") from None
    except (OSError, ValueError) as e:
        raise LockError(f"{path}: not a readable JSON lock file ({e})") from None
    if not isinstance(lock, dict):
        raise LockError(f"{path}: a lock is a JSON object, got {type(lock).__name__}")
    unknown = sorted(set(lock) - set(LOCK_KEYS))
    if unknown:
        raise LockError(f"{path}: unknown key(s) {', '.join(unknown)} (a lock has {', '.join(LOCK_KEYS)})")
    repo_id, revision, files = lock.get("repo_id"), lock.get("revision"), lock.get("files")
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise LockError(f"{path}: repo_id must be 'owner/name', got {repo_id!r}")
    if revision is not None and (not isinstance(revision, str) or not _COMMIT.fullmatch(revision)):
        raise LockError(f"{path}: revision must be a 40-hex commit hash (a branch or tag moves), got {revision!r}")
    patterns = lock.setdefault("patterns", [])
    if not isinstance(patterns, list) or not all(
        isinstance(p, str) and _PATTERN.fullmatch(p) and ".." not in p.split("/") for p in patterns
    ):
        raise LockError(f"{path}: patterns must be a list of relative globs (letters, digits, '.', '_', '-', '*', '?')")
    if not isinstance(files, dict) or not (files or patterns):
        raise LockError(
            f"{path}: files must be a non-empty mapping of file name -> {{size, digest}} (or give patterns)"
        )
    if lock.setdefault("repo_type", "model") not in REPO_TYPES:
        raise LockError(f"{path}: repo_type must be one of {REPO_TYPES}, got {lock['repo_type']!r}")
    check_file_names(files, path)
    for name, entry in files.items():
        check_entry(entry, f"{path}: files[{name!r}]")
    if complete:
        unfilled = (
            (["revision"] if revision is None else [])
            + [f"the files matching {p}" for p in patterns]
            + [f"{name} ({'/'.join(missing_values(files[name]))})" for name in files if missing_values(files[name])]
        )
        if unfilled:
            raise LockError(
                f"{path} is not filled in: no value for {', '.join(unfilled)}. Nothing is downloaded "
                f"without a pinned commit and a size and digest for every file; a lock that pins a commit "
                f"is completed from the Hub's tree at that commit (fetch-checkpoint, online), or write it "
                f"whole with: {lock_command(path, repo_id, revision)}"
            )
    return lock


def check_entry(entry, where: str) -> None:
    """One file of a lock: ``{"size": n, "sha256": hex}`` or ``{"size": n, "git_sha1": hex}`` (or
    both digests); a value may be ``null`` (not filled in yet), never of the wrong form."""
    allowed = {"size", *DIGESTS}
    if not isinstance(entry, dict) or "size" not in entry or not set(entry) & set(DIGESTS) or set(entry) - allowed:
        raise LockError(
            f'{where} must be {{"size": ..., "sha256": ...}} or {{"size": ..., "git_sha1": ...}}, got {entry!r}'
        )
    for key, length in DIGESTS.items():
        digest = entry.get(key)
        if digest is not None and (not isinstance(digest, str) or not re.fullmatch(f"[0-9a-f]{{{length}}}", digest)):
            raise LockError(f"{where}.{key} must be {length} lower-case hex digits, got {digest!r}")
    size = entry["size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise LockError(f"{where}.size must be a byte count, got {size!r}")


def missing_values(entry: dict) -> list[str]:
    """What a lock entry lacks before it can pin a file: its size, or any digest at all."""
    missing = ["size"] if entry.get("size") is None else []
    if not any(entry.get(k) for k in DIGESTS):
        missing.append("/".join(k for k in DIGESTS if k in entry))
    return missing


def is_complete(lock: dict) -> bool:
    return lock.get("revision") is not None and not any(missing_values(e) for e in lock["files"].values())
    return lock


def _unique_keys(pairs):
    """A JSON object whose keys are all distinct: ``json`` would keep the last of two silently."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _spelling_key(name: str) -> str:
    """The path a file name denotes, so that ``./a``, ``a//b``, ``a/`` and ``a\\b`` compare equal to ``a``, ``a/b``."""
    return posixpath.normpath(name.replace("\\", "/")).lstrip("/")


def check_file_names(names, where) -> None:
    """Every file name of a lock (or of ``lock-checkpoint --file``) is one plain relative path, not a
    second spelling of another (``./config.json`` beside ``config.json`` would be fetched twice into
    one file), and not a name the fetch reserves; else a ``LockError`` naming it (``where``: the lock)."""
    seen = {}
    for name in names:
        key = _spelling_key(name)
        if key in seen:
            raise LockError(f"{where}: files lists {key!r} twice, as {seen[key]!r} and {name!r}; keep one spelling")
        seen[key] = name
    for name in names:
        if not _FILE_NAME.fullmatch(name) or name != posixpath.normpath(name) or ".." in name.split("/"):
            raise LockError(
                f"{where}: file name {name!r} must be a plain relative path of letters, digits, '.', '_', "
                f"'-' (no '.', '..' or empty part, no leading or trailing '/')"
            )
        if name in RESERVED_TOP or posixpath.basename(name) in RESERVED_ANY_DEPTH:
            raise LockError(
                f"{where}: file name {name!r} is reserved ({MANIFEST} is the manifest the fetch writes, "
                f"{MODEL_MANIFEST} the one a model directory is verified against); a lock cannot list it"
            )


def checkpoint_name(repo_id: str) -> str:
    """The directory name of a repository's checkpoint: ``ByteDance-Seed/BAGEL-7B-MoT`` -> ``bagel-7b-mot``."""
    return repo_id.rsplit("/", 1)[-1].lower()


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now: huggingface_hub reads it once, at import, so a process that sets it
    later (a test, a notebook) would still go online without this."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@contextmanager
def _hub_progress(progress: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        yield
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


def _snapshot(
    repo_id: str, revision: str, files, cache_dir=None, progress: bool = True, repo_type: str = "model"
) -> Path:
    """The cache's snapshot folder of ``revision`` holding (at least) ``files``.

    ``snapshot_download`` with a commit hash and everything cached downloads nothing (online it may
    still list the commit's files); with HF_HUB_OFFLINE=1 we pass ``local_files_only``, so it makes no
    request at all. A blob cut short
    by an interrupted download stays ``blobs/<hash>.incomplete`` in the cache and huggingface_hub
    resumes it on the next call; it only ever exposes complete blobs under ``snapshots/``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = _offline()
    try:
        with _hub_progress(progress):
            folder = snapshot_download(
                repo_id,
                revision=revision,
                repo_type=repo_type,
                allow_patterns=sorted(files),
                cache_dir=cache_dir,
                local_files_only=offline,
            )
    except LocalEntryNotFoundError as e:
        where = cache_dir or "the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub)"
        raise FileNotFoundError(
            f"{repo_id}@{revision} is not complete in {where}{' and HF_HUB_OFFLINE is set' if offline else ''}: {e}"
        ) from None
    return Path(folder)


def _bar(total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)


def verify_files(directory, files: dict, progress: bool = True, where: dict | None = None, label=None) -> dict:
    """Every file of ``files`` ({name: {size, sha256 and/or git_sha1}}) is in ``directory`` with that
    size and every digest stated (streamed, one pass per file, one progress bar over all bytes);
    otherwise an ``IntegrityError`` naming each bad file, with the expected and the found digest.
    ``where`` maps a name to its ``CacheEntry`` (bytes checked to lie in the Hugging Face cache), so
    the message says which cache files to delete, and only those; ``label`` names the files in it
    (default: the directory). Returns ``{name: {size, sha256, git_sha1}}`` as found."""
    directory, where = Path(directory), where or {}
    problems, present, found = [], {}, {}

    def blob(name):
        return f" ({where[name].advice()})" if name in where else ""

    for name, entry in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name}: size expected {entry['size']} bytes, found {path.stat().st_size}{blob(name)}")
        else:
            present[name] = path
    with _bar(sum(files[n]["size"] for n in present), progress, "verifying digests") as bar:
        for name, path in present.items():
            digests = file_digests(path, bar.update)
            found[name] = {"size": path.stat().st_size, **digests}
            for key in DIGESTS:
                if files[name].get(key) is not None and files[name][key] != digests[key]:
                    problems.append(f"{name}: {key} expected {files[name][key]}, found {digests[key]}{blob(name)}")
    if problems:
        raise IntegrityError(
            f"{label or directory}: {len(problems)} file(s) do not match the lock: " + "; ".join(problems)
        )
    return found


class CacheEntry:
    """One file of a snapshot, checked to hold bytes of the cache itself: ``link`` is
    ``snapshots/<commit>/<name>``, ``blob`` the regular file it resolves to, ``st`` that file's
    ``os.stat`` at the check (so the file linked or copied later is provably the one checked)."""

    def __init__(self, link: Path, blob: Path, st: os.stat_result, in_place: bool = False):
        self.link, self.blob, self.st, self.in_place = link, blob, st, in_place

    def advice(self) -> str:
        if self.in_place:
            return f"its bytes: {self.link} in the Hugging Face cache; delete that cache file to download it again"
        return (
            f"its bytes: {self.blob} in the Hugging Face cache; delete that blob and its link {self.link} "
            f"to download it again"
        )


def _cache_entries(snapshot: Path, names) -> dict:
    """``{name: CacheEntry}`` for each file of the snapshot folder ``<repo>/snapshots/<commit>``, used
    only if it resolves to a regular file directly in the repository's own ``blobs/`` (huggingface_hub's
    layout), or is itself a regular file at that place with no link on the way (its layout where the
    file system has no symlinks). Anything else (a link out of the cache, into another repository's
    blobs, through a linked ``blobs/`` or snapshot folder) is refused, one line naming each entry,
    before anything is linked or copied: a hard link to a file outside the cache would let a later
    write through ``results/`` reach it, and the advice for wrong bytes would name it. A file the
    snapshot lacks (a dangling link included) is a ``FileNotFoundError`` naming it."""
    repo = Path(os.path.realpath(snapshot.parent.parent))
    blobs = repo / "blobs"
    if snapshot.parent.name != "snapshots":
        raise IntegrityError(f"{snapshot}: not a snapshot folder of a Hugging Face cache (<repo>/snapshots/<commit>)")
    missing = sorted(n for n in names if not (snapshot / n).is_file())
    if missing:
        raise FileNotFoundError(f"{snapshot}: missing from the downloaded snapshot: {', '.join(missing)}")
    entries, refused = {}, []
    for name in sorted(names):
        link = snapshot / name
        real = Path(os.path.realpath(link))
        in_place = repo / "snapshots" / snapshot.name / name
        st = os.stat(real)
        if (real.parent == blobs or real == in_place) and stat.S_ISREG(st.st_mode):
            entries[name] = CacheEntry(link, real, st, in_place=real == in_place)
        else:
            refused.append(f"{link} -> {real}")
    if refused:
        raise IntegrityError(
            f"{repo}: {len(refused)} cache entr{'y' if len(refused) == 1 else 'ies'} not a file of "
            f"the cache's own {blobs} (refused, nothing was linked or copied; remove the link itself "
            f"to download it again): " + "; ".join(refused)
        )
    return entries


def _same_file(st: os.stat_result, other: os.stat_result) -> bool:
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino) and stat.S_ISREG(other.st_mode)


def _materialise(entries: dict, target: Path) -> None:
    """Put each checked cache file into ``target``: a hard link to it where the file system allows it
    and the file is ours (no second copy of 30 GB; a link to another user's file would share its inode
    and permissions), else a copy. Never a symlink into the cache: the result must not change when the
    cache is cleaned. Links and copies never follow a symlink, and what was linked or read must be the
    very file ``_cache_entries`` checked (an entry swapped meanwhile is an error naming it)."""
    for name, entry in sorted(entries.items()):
        dst = target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if entry.st.st_uid == os.getuid():
            try:
                os.link(entry.blob, dst, follow_symlinks=False)
            except OSError:  # another file system, or links not allowed: copy
                pass
            else:
                if not _same_file(entry.st, os.lstat(dst)):
                    dst.unlink()
                    raise IntegrityError(f"{entry.blob}: changed in the Hugging Face cache while being fetched")
                continue
        fd = os.open(entry.blob, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as src:
            if not _same_file(entry.st, os.fstat(src.fileno())):
                raise IntegrityError(f"{entry.blob}: changed in the Hugging Face cache while being fetched")
            with open(dst, "xb") as out:
                shutil.copyfileobj(src, out, 1 << 24)


def _discard_leftovers(out_dir: Path) -> None:
    """Temporary directories an interrupted earlier fetch left beside ``out_dir`` (``atomic_path``'s
    ``.<name>.tmp-*``): never resumed or used, since nothing says how far they got."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        log.info("discarding %s, left by an interrupted fetch", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def tree_listing(repo_id: str, commit: str, repo_type: str = "model", cache_dir=None) -> dict | None:
    """``{path: {"size", "git_sha1", "lfs_sha256"}}`` of every file of ``repo_id`` at ``commit``, from the
    Hub's tree listing (no download), or offline from the listing huggingface_hub cached beside an
    earlier download of that commit (``trees/<commit>.json``); None offline without one."""
    if _offline():
        return _cached_tree(repo_id, commit, repo_type, cache_dir)
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        listing = HfApi().list_repo_tree(repo_id, revision=commit, recursive=True, repo_type=repo_type)
        return {
            f.path: {
                "size": f.size,
                "git_sha1": f.blob_id,
                "lfs_sha256": f.lfs.sha256 if f.lfs is not None else None,
            }
            for f in listing
            if isinstance(f, RepoFile)
        }
    except OSError as e:  # huggingface_hub's HTTP errors are OSErrors
        raise LockError(f"cannot list {repo_type} {repo_id}@{commit} on the Hub: {e}") from None


def _cached_tree(repo_id: str, commit: str, repo_type: str, cache_dir) -> dict | None:
    try:
        from huggingface_hub import constants
        from huggingface_hub._tree_cache import read_tree_cache
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:  # a huggingface_hub that caches no tree listing
        return None
    folder = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    entries = read_tree_cache(str(folder), commit)
    if entries is None:
        return None
    return {name: {"size": e.size, "git_sha1": e.blob_id, "lfs_sha256": e.lfs_sha256} for name, e in entries.items()}


def entry_from_tree(listed: dict) -> dict:
    """A lock entry as the Hub states it: an LFS file by its sha256, a plain git file by its blob id."""
    if listed.get("lfs_sha256"):
        return {"size": listed["size"], "sha256": listed["lfs_sha256"]}
    return {"size": listed["size"], "git_sha1": listed["git_sha1"]}


def matching(tree: dict, pattern: str, where: str) -> list[str]:
    """The files of ``tree`` a lock's ``pattern`` lists, each a name a lock may hold; none is a
    ``FileNotFoundError`` (``where``: the repository at its commit, and the lock)."""
    matches = sorted(n for n in tree if fnmatch.fnmatchcase(n, pattern))
    if not matches:
        raise FileNotFoundError(f"{where}: no file matches {pattern}")
    check_file_names(matches, f"{where} (files matching {pattern})")
    return matches


def complete_lock(lock: dict, tree: dict | None, where) -> tuple[dict, list[str]]:
    """The lock's files with every missing size and digest filled from ``tree`` (the Hub's listing at
    the lock's commit), and the list of ``name.key`` values so filled. A value the lock states that the
    tree contradicts is an ``IntegrityError`` naming the file and both values; a locked file the tree
    lacks is a ``FileNotFoundError``; a lock still incomplete without a tree is a ``LockError``."""
    files = {name: dict(entry) for name, entry in lock["files"].items()}
    patterns = lock.get("patterns") or []
    if tree is None:
        if patterns or any(missing_values(e) for e in files.values()):
            read_lock(where)  # raises, naming every missing value and the command that fills them
        return files, []
    absent = sorted(n for n in files if n not in tree)
    if absent:
        raise FileNotFoundError(f"{lock['repo_id']}@{lock['revision']} has no file(s) {', '.join(absent)} ({where})")
    filled, problems = [], []
    for pattern in patterns:
        for name in matching(tree, pattern, f"{lock['repo_id']}@{lock['revision']} ({where})"):
            if name not in files:
                files[name] = {"size": None, "sha256": None, "git_sha1": None}
                filled.append(f"{name} (matches {pattern})")
    for name, entry in sorted(files.items()):
        hub = entry_from_tree(tree[name])
        for key, value in hub.items():
            if entry.get(key) is None:  # the Hub's digest is checked after download beside the lock's own
                entry[key] = value
                filled.append(f"{name}.{key}")
            elif entry[key] != value:
                problems.append(f"{name}: {key} locked {entry[key]}, the Hub states {value}")
        for key in [k for k in DIGESTS if k in entry and entry[k] is None]:
            del entry[key]
    if problems:
        raise IntegrityError(
            f"{where}: {len(problems)} value(s) disagree with the Hub's tree of {lock['repo_id']}@{lock['revision']} "
            "(refused, nothing downloaded): " + "; ".join(problems)
        )
    return files, filled


def _locked_snapshot(lock_path, cache_dir, progress: bool, before_download=None):
    """The lock, completed from the Hub's tree at its commit, and the checked cache entries of its
    files (downloaded into the cache as needed): what both fetches start from."""
    lock = read_lock(lock_path, complete=False)
    repo_id, revision, repo_type = lock["repo_id"], lock["revision"], lock["repo_type"]
    if revision is None:
        read_lock(lock_path)  # raises: a lock without a commit pins nothing
    tree = tree_listing(repo_id, revision, repo_type, cache_dir)
    files, filled = complete_lock(lock, tree, lock_path)
    if before_download is not None:
        before_download()
    snapshot = _snapshot(repo_id, revision, files, cache_dir=cache_dir, progress=progress, repo_type=repo_type)
    return lock, files, filled, snapshot, _cache_entries(snapshot, files)


def _manifest(lock_path, lock: dict, files: dict, found: dict, filled: list) -> dict:
    return {
        "source": "huggingface",
        "repo_id": lock["repo_id"],
        "repo_type": lock["repo_type"],
        "revision": lock["revision"],
        "lock": Path(lock_path).name,
        "files": found,
        "verified": {name: sorted(k for k in entry if k in DIGESTS) for name, entry in files.items()},
        "completed_from_hub": filled,
    }


def _log_fetch(lock_path, lock: dict, filled: list, n_files: int, where) -> None:
    if filled:
        log.info("%s: %d value(s) completed from the Hub's tree: %s", lock_path, len(filled), ", ".join(filled))
    log.info("%s@%s: %d files verified -> %s", lock["repo_id"], lock["revision"], n_files, where)


def fetch_checkpoint(lock_path, out_dir, cache_dir=None, progress: bool = True) -> Path:
    """Download the locked files at the locked commit (or take them from the Hugging Face cache;
    offline with HF_HUB_OFFLINE=1), complete the lock's missing digests from the Hub's tree at that
    commit, verify every file against every digest, and write ``out_dir`` with a ``checkpoint.json``
    manifest of all it verified. ``out_dir`` appears complete and verified, or not at all."""
    out_dir = Path(out_dir)
    lock, files, filled, _, entries = _locked_snapshot(
        lock_path, cache_dir, progress, before_download=lambda: _discard_leftovers(out_dir)
    )
    label = f"{lock['repo_id']}@{lock['revision']} (for {out_dir})"
    with atomic_path(out_dir, is_dir=True) as tmp:
        _materialise(entries, tmp)
        found = verify_files(tmp, files, progress=progress, where=entries, label=label)
        manifest = _manifest(lock_path, lock, files, found, filled)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _log_fetch(lock_path, lock, filled, len(files), out_dir)
    return out_dir


def fetch_input(lock_path, out_manifest, cache_dir=None, progress: bool = True) -> dict:
    """An outside input read in place from the Hugging Face cache (a detector, a benchmark dataset):
    download the locked files at the locked commit into the cache, complete and verify them as
    ``fetch_checkpoint`` does, in the cache itself, and write ``out_manifest`` (atomically): the
    repository, the commit the jobs read (``revision``) and every digest verified. Jobs
    that take the manifest as input then read that commit offline."""
    lock, files, filled, snapshot, entries = _locked_snapshot(lock_path, cache_dir, progress)
    label = f"{lock['repo_id']}@{lock['revision']} (in {snapshot})"
    found = verify_files(snapshot, files, progress=progress, where=entries, label=label)
    manifest = _manifest(lock_path, lock, files, found, filled)  # no cache path: the same on every machine
    write_json(out_manifest, manifest)
    _log_fetch(lock_path, lock, filled, len(files), f"{snapshot} (manifest {out_manifest})")
    return manifest


def verify_checkpoint(directory, progress: bool = False) -> dict:
    """Re-check a fetched directory against its own ``checkpoint.json``; returns the manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{directory} is not a fetched checkpoint (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    verify_files(directory, manifest["files"], progress=progress)
    return manifest


def resolve_commit(repo_id: str, revision: str, repo_type: str = "model") -> str:
    """The commit a branch, tag or commit names on the Hub (one request; none for a commit hash)."""
    if _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        commit = HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
    except OSError as e:  # offline is refused before (lock_checkpoint)
        raise LockError(f"cannot resolve {repo_type} {repo_id}@{revision} on the Hub: {e}") from None
    if not commit or not _COMMIT.fullmatch(commit):
        raise LockError(f"the Hub gave no commit hash for {repo_id}@{revision} (got {commit!r})")
    return commit


def lock_checkpoint(repo_id: str, revision: str, files, out_lock, repo_type: str = "model", patterns=()) -> dict:
    """Write the lock of ``files`` of ``repo_id`` at ``revision`` (a branch, tag or commit; the lock
    records the commit it resolves to) from the Hub's tree listing at that commit, downloading
    nothing: each file's size and the digest the Hub states for it. Where ``out_lock`` already records
    a value for the same commit, the Hub must agree with it (a lock is regenerated, never silently
    changed); at another commit, changed files are logged. ``patterns``: files listed by glob, the
    matches at that commit are written out (and the patterns kept, for the next lock). The lock is
    written atomically."""
    files, patterns = sorted(dict.fromkeys(files)), list(patterns)
    if not _REPO_ID.fullmatch(repo_id) or not (files or patterns):
        raise LockError(f"cannot lock {repo_id!r}: " + ("no files" if files == [] else "repo id must be 'owner/name'"))
    if repo_type not in REPO_TYPES:
        raise LockError(f"cannot lock {repo_id}: repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
    check_file_names(files, f"cannot lock {repo_id}")
    if _offline():
        raise LockError("lock-checkpoint asks the Hub which commit and digests to trust: unset HF_HUB_OFFLINE")
    commit = resolve_commit(repo_id, revision, repo_type)
    tree = tree_listing(repo_id, commit, repo_type)
    absent = [n for n in files if n not in tree]
    if absent:
        raise FileNotFoundError(f"{repo_id}@{commit} has no file(s) {', '.join(absent)}")
    for pattern in patterns:
        files = sorted({*files, *matching(tree, pattern, f"{repo_id}@{commit}")})
    entries = {name: entry_from_tree(tree[name]) for name in files}
    problems, note = _disagreements(out_lock, repo_id, commit, entries)
    if problems:
        raise IntegrityError(f"{repo_id}@{commit}: not locked, the Hub disagrees with the lock: " + "; ".join(problems))
    lock = {"repo_id": repo_id, "repo_type": repo_type, "revision": commit, "files": entries}
    if patterns:
        lock["patterns"] = patterns
    if note:
        lock["note"] = note
    write_json(out_lock, lock)
    log.info("locked %s@%s (%d files, from the Hub's tree) -> %s", repo_id, commit, len(entries), out_lock)
    return lock


def _disagreements(out_lock, repo_id: str, commit: str, entries: dict) -> tuple[list[str], str | None]:
    """Values an existing lock already records for the same repository and commit that the Hub
    contradicts (an error), and the existing lock's note; at another commit, changes are only logged."""
    try:
        old = read_lock(out_lock, complete=False)
    except FileNotFoundError:
        return [], None
    if old["repo_id"] != repo_id:
        return [], None
    problems = []
    for name, entry in entries.items():
        before = old["files"].get(name) or {}
        for key in ("size", *DIGESTS):
            if before.get(key) is not None and key in entry and before[key] != entry[key]:
                if old["revision"] == commit:
                    problems.append(
                        f"{name}: {out_lock} records {key} {before[key]} for this commit, the Hub {entry[key]}"
                    )
                else:
                    log.warning(
                        "%s: %s changed from %s (%s) to %s (%s)",
                        name,
                        key,
                        before[key],
                        old["revision"],
                        entry[key],
                        commit,
                    )
    return problems, old.get("note")
