"""Fetched artifacts made usable (workflow/scripts/fetch_artifacts.sh, after ``dvc pull``).

Two steps, each a subcommand of ``unisparse artifacts`` (see the script's header for the why):

- ``verify_fetched``: every file of the outs in dvc.lock is checked against the md5 its DVC
  directory manifest (the ``.dir`` object, from the DVC cache or else the remote) records. DVC alone
  is not enough: without the remote's ``verify`` a corrupted object lands in the workspace with exit
  status 0; with it, DVC removes all of results/ and names nothing, and a corrupted manifest's wrong
  file list is checked out silently. Each file that differs or is missing is named; a corrupted copy
  is removed from the DVC cache (so a repaired remote is fetched from again) and from the workspace;
  exit status 4.
- ``restore_run_order``: ``dvc pull`` writes files with fresh timestamps in arbitrary order, which
  Snakemake reads as "input newer than output". The recorded outputs get the order the producer's
  run wrote them (Snakemake's metadata records' end times, ``STEP`` apart, before now and after every
  input outside the pulled tree); an output made from other input content than the checkout's is
  made older than that input, as it would be in the producer's checkout.

Messages go to stderr, each starting with ``PREFIX`` (the script's name: tests and users grep it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import yaml

from .records import snakemake_path

PREFIX = "fetch_artifacts.sh"
SHOWN = 10  # problems listed in full
NOT_AS_RECORDED = 4  # exit status: a file did not arrive as recorded
STEP = 0.001  # seconds between consecutive outputs; file systems keep at least this resolution
CHUNK = 1 << 20


def _say(line: str) -> None:
    print(f"{PREFIX}: {line}", file=sys.stderr)


def md5_of(chunks) -> str:
    h = hashlib.md5()
    for block in chunks:
        h.update(block)
    return h.hexdigest()


def md5sum(path) -> str:
    with open(path, "rb") as f:
        return md5_of(iter(lambda: f.read(CHUNK), b""))


def intact(oid: str, digest: str) -> bool:
    """Whether content with md5 ``digest`` is object ``oid`` (a manifest's oid is the md5 of its
    content + ".dir")."""
    return digest == oid.split(".")[0]


def lock_outs(lock="dvc.lock") -> list[dict]:
    """The outs of every stage in dvc.lock, in its order."""
    with open(lock) as f:
        stages = (yaml.safe_load(f) or {}).get("stages") or {}
    return [o for stage in stages.values() for o in stage.get("outs") or []]


def dvc_remote(name: str | None = None):
    """The remote's object store, through DVC's Python API (None where that is not at hand)."""
    try:
        from dvc.repo import Repo

        return Repo(".").cloud.get_remote_odb(name, "fetch")
    except Exception:
        return None


class Verification:
    """One check of the workspace against dvc.lock: the problems found, the files checked.

    ``remote``: a callable returning the remote's object store (``oid_to_path``, ``fs.exists``,
    ``fs.open``) or None; asked once, only when an object is not in the cache."""

    def __init__(self, cache, pull_failed: bool = False, remote=dvc_remote):
        self.cache, self.pull_failed, self._remote_of = cache, pull_failed, remote
        self._remote, self._remote_asked = None, False
        self.states: dict[str, str] = {}
        self.problems: list[str] = []
        self.unpulled: dict[str, list[str]] = {}
        self.checked = 0

    def object_path(self, oid: str) -> str:
        return os.path.join(self.cache, "files", "md5", oid[:2], oid[2:])

    def state(self, oid: str) -> str:
        """The cached object of ``oid``: 'ok', 'absent', or the md5 of its corrupted content (which is
        then removed from the cache, so that the next fetch downloads it again)."""
        if oid not in self.states:
            path = self.object_path(oid)
            self.states[oid] = "absent"
            if os.path.isfile(path):
                actual = md5sum(path)
                self.states[oid] = "ok" if intact(oid, actual) else actual
                if not intact(oid, actual):
                    os.remove(path)
        return self.states[oid]

    def remote(self):
        if not self._remote_asked:
            self._remote, self._remote_asked = self._remote_of(), True
        return self._remote

    def in_remote(self, oid: str):
        """('missing' | 'ok' | md5 of a corrupted copy | None when unknown, content when it is a manifest)."""
        odb = self.remote()
        if odb is None:
            return None, None
        try:
            path = odb.oid_to_path(oid)
            if not odb.fs.exists(path):
                return "missing", None
            with odb.fs.open(path, "rb") as f:
                if oid.endswith(".dir"):
                    content = f.read()
                    return ("ok" if intact(oid, md5_of([content])) else md5_of([content])), content
                actual = md5_of(iter(lambda: f.read(CHUNK), b""))
            return ("ok" if intact(oid, actual) else actual), None
        except Exception:
            return None, None

    def why_absent(self, oid: str, found) -> str:
        """Why an object is not in the cache, from what the remote holds (``in_remote``)."""
        if found == "missing":
            return "missing in the remote"
        if found == "ok":
            return "not fetched, though the remote has it intact (a download error? fetch again)"
        if found:
            return f"corrupted in the remote (it has md5 {found}, recorded is {oid}; DVC's verify refused it)"
        see = ", see DVC's error above" if self.pull_failed else ""
        return f"not fetched (missing or corrupted in the remote{see})"

    def check_file(self, path: str, want: str, out: str) -> None:
        """Compare one workspace file with its recorded md5; a corrupted copy that came from the cache
        leaves the workspace too."""
        self.checked += 1
        have = md5sum(path) if os.path.isfile(path) else None
        if have == want:
            return
        cached = self.state(want)
        if cached == "ok":
            if have is None:
                self.unpulled.setdefault(out, []).append(path)
            else:
                self.problems.append(
                    f"{path}: differs from the recorded content (md5 {have}, recorded {want});"
                    " DVC did not overwrite it (a local change? --force replaces it)"
                )
        elif cached == "absent":
            stale = "; the file in the workspace is not the recorded one either" if have else ""
            self.problems.append(f"{path}: {self.why_absent(want, self.in_remote(want)[0])}{stale}")
        else:
            gone = ""
            if have == cached:
                os.remove(path)
                gone = " and from the workspace"
            self.problems.append(
                f"{path}: corrupted: it arrived with md5 {cached}, recorded is {want}"
                f" (removed from the DVC cache{gone})"
            )

    def manifest(self, path: str, oid: str):
        """The entries of a directory out's manifest (cache, else remote), or None (a problem noted)."""
        state = self.state(oid)
        if state == "ok":
            with open(self.object_path(oid), "rb") as f:
                return json.loads(f.read())
        found, content = self.in_remote(oid) if state == "absent" else ("corrupted", None)
        if found == "ok":
            return json.loads(content)
        if state == "absent":
            why = self.why_absent(oid, found)
        else:
            why = f"corrupted (md5 {state}; removed from the DVC cache)"
        self.problems.append(
            f"{path}/: its file list (DVC manifest {oid}) is {why}: none of its files can be"
            f" checked, and what DVC put in {path}/ may be the wrong files: do not use them"
        )
        return None

    def check_out(self, out: dict) -> None:
        """Check one out of dvc.lock: a file, or every file its directory manifest lists."""
        path, oid = os.path.normpath(out["path"]), out.get("md5")
        if out.get("hash") != "md5" or not oid:
            _say(f"{path} is not checked (recorded with DVC 2's hash; record the artifacts again with DVC 3)")
            return
        if not oid.endswith(".dir"):
            self.check_file(path, oid, path)
            return
        for entry in self.manifest(path, oid) or []:
            self.check_file(os.path.join(path, entry["relpath"]), entry["md5"], path)

    def report(self) -> list[str]:
        """Every problem, with the files DVC left out: listed one by one when they are the only
        problem, else summed up per out (they are a consequence of the failure named)."""
        problems = list(self.problems)
        for out, paths in self.unpulled.items():
            if self.problems:
                problems.append(
                    f"{out}/: {len(paths)} more file(s) not in the workspace, not checked out because of"
                    f" the failure above: {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}"
                )
            else:
                problems += [f"{p}: not in the workspace" for p in paths]
        return problems


def verify_fetched(cache, lock="dvc.lock", pull_failed: bool = False, remote=dvc_remote) -> int:
    """Check the workspace against dvc.lock (see the module docstring): 0, or ``NOT_AS_RECORDED``
    with each problem named (the first ``SHOWN``) on stderr."""
    outs = lock_outs(lock)
    verification = Verification(cache, pull_failed, remote)
    for out in outs:
        verification.check_out(out)
    problems = verification.report()
    if problems:
        more = [f"... and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else []
        for line in problems[:SHOWN] + more:
            _say(f"NOT AS RECORDED: {line}")
        _say(
            "the files named above are not the recorded artifacts; repair the remote (push them again from a"
            " checkout that has them: bash workflow/scripts/record_artifacts.sh) and fetch again"
        )
        return NOT_AS_RECORDED
    _say(f"all {verification.checked} files of {', '.join(o['path'] for o in outs)} have their recorded md5")
    return 0


def under(path: str, roots) -> bool:
    path = os.path.normpath(path)
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def metadata_records(root=".snakemake/metadata") -> dict[str, dict]:
    """Snakemake's file-backed metadata records: output path -> record (JSON); unreadable ones skipped."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            try:
                key = snakemake_path(os.path.relpath(full, root).split(os.sep))
                with open(full) as f:
                    found[key] = json.load(f)
            except (ValueError, UnicodeDecodeError):
                continue
    return found


def carrier(path: str) -> str:
    """The file whose mtime Snakemake reads for an output (a directory's .snakemake_timestamp)."""
    flag = os.path.join(path, ".snakemake_timestamp")
    return flag if os.path.isdir(path) and os.path.exists(flag) else path


def same_content(path: str, checksum: str) -> bool:
    """Whether ``path`` has the content a record's input checksum (``[algorithm:]hexdigest``) names."""
    algorithm, _, digest = checksum.rpartition(":")
    h = hashlib.new(algorithm or "sha256")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest() == digest


def _stamp_all(roots, stamp: float) -> int:
    """Give every path under ``roots`` (and each root) the time ``stamp``; the number of paths below them."""
    touched = 0
    for root in roots:
        if os.path.exists(root):
            for dirpath, dirs, files in os.walk(root, topdown=False):
                for name in files + dirs:
                    os.utime(os.path.join(dirpath, name), (stamp, stamp), follow_symlinks=False)
                    touched += 1
            os.utime(root, (stamp, stamp))
    return touched


def _older_than_changed_inputs(recs: dict) -> list[str]:
    """Make each output older than an input whose content differs from the one it was made from (a
    file changed in git since the recording, or an upstream artifact remade without its consumers);
    the outputs so made older, with the input."""
    changed = []
    for key, r in recs.items():
        for path, checksum in (r.get("input_checksums") or {}).items():
            if os.path.isfile(path) and checksum and not same_content(path, checksum):
                older = os.stat(carrier(path)).st_mtime - STEP
                if older < os.stat(carrier(key)).st_mtime:
                    os.utime(carrier(key), (older, older), follow_symlinks=False)
                changed.append(f"{key} (input {path})")
    return changed


def restore_run_order(lock="dvc.lock", metadata=".snakemake/metadata", now: float | None = None) -> dict:
    """Timestamps in the order the producer's run made its outputs (see the module docstring); a
    summary on stderr. Returns ``{"records": n, "touched": n, "changed": [...]}``."""
    outs = sorted({o["path"] for o in lock_outs(lock)})
    data_outs = [o for o in outs if not under(o, [".snakemake"])]
    recs = {k: r for k, r in metadata_records(metadata).items() if under(k, data_outs) and os.path.exists(k)}
    external = {i for r in recs.values() for i in (r.get("input") or []) if not under(i, data_outs)}
    # the producer's order of outputs (a job's outputs end after its inputs), no gaps kept
    order = sorted({r.get("endtime") or 0.0 for r in recs.values()})
    rank = {t: i for i, t in enumerate(order)}
    newest_external = max([os.stat(i).st_mtime for i in external if os.path.exists(i)], default=0.0)
    now = time.time() if now is None else now
    start = max(now - (len(order) + 1) * STEP, newest_external + STEP)

    touched = _stamp_all(data_outs, start)  # everything pulled first gets the oldest stamp ...
    for key, r in recs.items():  # ... then each recorded output its place in the run's order
        stamp = start + (1 + rank[r.get("endtime") or 0.0]) * STEP
        os.utime(carrier(key), (stamp, stamp), follow_symlinks=False)
    changed = _older_than_changed_inputs(recs)
    _say(
        f"restored the run order of {len(recs)} recorded outputs ({touched} pulled paths under {', '.join(data_outs)})"
    )
    for line in changed:
        _say(f"made from other input content than the checkout's: {line}")
    return {"records": len(recs), "touched": touched, "changed": changed}
