"""A local Hugging Face Hub: an HTTP server on 127.0.0.1 serving fake repositories, models and
datasets, through the endpoints huggingface_hub 2.x calls, so that the real client (``HfApi``,
``snapshot_download``, ``hf_hub_download``) runs against it unchanged.

Served, as the Hub serves them:
- ``GET /api/{models|datasets}/{repo}/revision/{rev}``: the repository's info (``sha``, ``siblings``);
- ``GET /api/{models|datasets}/{repo}/tree/{rev}[/{path}]?recursive=``: the tree listing, each file's
  size and git blob id (``oid``), plus ``lfs: {oid: sha256, size, pointerSize}`` for LFS files;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` and ``/datasets/{repo}/resolve/{rev}/{path}``: the
  file, with ``X-Repo-Commit``, ``ETag`` (the git blob id; ``X-Linked-Etag`` the sha256 and
  ``X-Linked-Size`` the size for an LFS file) and ``Range`` for a resumed download.

Every request is counted (``requests``), so a test can prove that an offline rerun made none; a file
can be served with other bytes than its listed digests (``tamper``: a corrupted mirror or a cut
download). The server stops when its ``with`` block ends, and by itself after ``lifetime`` seconds
whatever happens to the test.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from helpers.hub import git_blob_id

#: file names stored in LFS on the Hub (weights, archives, parquet), as ``.gitattributes`` usually says
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".tar", ".pt", ".pth", ".png", ".jpg", ".zip", ".gz")


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file git stores for an LFS file: its blob id is what the tree lists."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
    ).encode()


class Repo:
    """One fake repository: a single commit (the sha1 of its contents) with ``main`` pointing at it."""

    def __init__(self, repo_id: str, files: dict, repo_type: str = "model", lfs=None):
        self.repo_id, self.repo_type = repo_id, repo_type
        self.files = {name: bytes(data) for name, data in files.items()}
        is_lfs = lfs or (lambda name: name.endswith(LFS_SUFFIXES))
        self.lfs = {name for name in self.files if is_lfs(name)}
        self.served = dict(self.files)  # what resolve returns: ``tamper`` changes it, never the listing
        h = hashlib.sha1(repo_type.encode() + repo_id.encode())
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        self.commit = h.hexdigest()

    def entry(self, name: str) -> dict:
        data = self.files[name]
        if name in self.lfs:
            pointer = lfs_pointer(data)
            return {
                "type": "file",
                "path": name,
                "size": len(data),
                "oid": git_blob_id(pointer),
                "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)},
            }
        return {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}

    def tree(self, path: str = "", recursive: bool = False) -> list[dict]:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        files = [n for n in sorted(self.files) if n.startswith(prefix)]
        if recursive:
            folders = sorted({"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)})
            folders = [f for f in folders if f.startswith(prefix) and f != prefix.rstrip("/")]
            return [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders] + [
                self.entry(n) for n in files
            ]
        children, out = set(), []
        for name in files:
            rest = name[len(prefix) :]
            if "/" in rest:
                folder = prefix + rest.split("/", 1)[0]
                if folder not in children:
                    children.add(folder)
                    out.append({"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
            else:
                out.append(self.entry(name))
        return out

    def info(self) -> dict:
        siblings = []
        for name in sorted(self.files):
            e = self.entry(name)
            siblings.append(
                {
                    "rfilename": name,
                    "size": e["size"],
                    "blobId": e["oid"],
                    **(
                        {"lfs": {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 130}}
                        if "lfs" in e
                        else {}
                    ),
                }
            )
        return {"id": self.repo_id, "sha": self.commit, "private": False, "siblings": siblings}


_API = re.compile(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?")
_RESOLVE = re.compile(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class LocalHub:
    """``with LocalHub() as hub: hub.add(...)``; ``hub.endpoint`` is what ``HF_ENDPOINT`` is set to."""

    def __init__(self, lifetime: float = 1800.0):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the count is the record
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    # --- repositories ---------------------------------------------------------------------------

    def add(self, repo_id: str, files: dict, repo_type: str = "model", lfs=None) -> Repo:
        repo = Repo(repo_id, files, repo_type, lfs)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def tamper(self, repo_id: str, name: str, data: bytes, repo_type: str = "model") -> None:
        """Serve ``data`` for ``name`` while the listing keeps the true size and digests."""
        self.repos[(repo_type, repo_id)].served[name] = bytes(data)

    def count(self, kind: str | None = None) -> int:
        """Requests served so far (``kind``: only those whose path contains it, e.g. ``/resolve/``)."""
        with self._lock:
            return sum(1 for _, path in self.requests if kind is None or kind in path)

    # --- serving --------------------------------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str, revision: str):
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return None, ("RepoNotFound", f"Repository {repo_id} not found")
        if revision not in ("main", repo.commit):
            return None, ("RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, None

    def _handle(self, request: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(request.path)
        path = unquote(url.path)
        with self._lock:
            self.requests.append((request.command, path))
        if m := _API.fullmatch(path):
            kind, repo_id, what, revision, sub = m.groups()
            repo, error = self._repo(kind[:-1], repo_id, revision)
            if error:
                return self._send(request, 404, {"error": error[1]}, head, {"X-Error-Code": error[0]})
            if what == "revision":
                return self._send(request, 200, repo.info(), head)
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send(request, 200, repo.tree(sub or "", recursive), head)
        if m := _RESOLVE.fullmatch(path):
            dataset, repo_id, revision, name = m.groups()
            repo, error = self._repo("dataset" if dataset else "model", repo_id, revision)
            if error:
                return self._send(request, 404, {"error": error[1]}, head, {"X-Error-Code": error[0]})
            if name not in repo.files:
                return self._send(request, 404, {"error": f"{name} not found"}, head, {"X-Error-Code": "EntryNotFound"})
            entry, data = repo.entry(name), repo.served[name]
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
            if "lfs" in entry:
                headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(entry["size"])})
            status, body = 200, data
            if (r := re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))) and not head:
                start = int(r.group(1))
                end = int(r.group(2)) if r.group(2) else len(data) - 1
                status, body = 206, data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(request, status, body, head, headers, content_type="application/octet-stream")
        return self._send(request, 404, {"error": f"no such endpoint {path}"}, head)

    def _send(self, request, status, body, head, headers=None, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        if not head:
            request.wfile.write(data)

    # --- lifetime -------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._timer.cancel()
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def point_client_at(monkeypatch, endpoint: str) -> None:
    """Make this process's huggingface_hub (which read ``HF_ENDPOINT`` at import) and its children use
    ``endpoint``, online: the URL templates are derived from the endpoint once, at import, too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
