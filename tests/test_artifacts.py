"""The fetch's steps as package code (unisparse.artifacts, run by workflow/scripts/fetch_artifacts.sh
through `unisparse artifacts`): every file checked against dvc.lock's md5 with each problem named,
and the producer's run order restored in the timestamps. On small fake DVC caches and Snakemake
metadata in a temporary directory: no dvc or snakemake process."""

import base64
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from unisparse import artifacts, cli
from unisparse.records import snakemake_path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [REPO / "workflow/scripts" / name for name in ("fetch_artifacts.sh", "record_artifacts.sh", "common.sh")]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def obj(cache: Path, oid: str) -> Path:
    return cache / "files/md5" / oid[:2] / oid[2:]


def put(cache: Path, data: bytes, oid: str | None = None) -> str:
    """Store ``data`` in the cache as object ``oid`` (default: its md5, i.e. intact)."""
    oid = oid or md5(data)
    obj(cache, oid).parent.mkdir(parents=True, exist_ok=True)
    obj(cache, oid).write_bytes(data)
    return oid


def manifest_bytes(files: dict[str, bytes]) -> bytes:
    return json.dumps([{"md5": md5(v), "relpath": k} for k, v in sorted(files.items())]).encode()


def dir_oid(files: dict[str, bytes]) -> str:
    return md5(manifest_bytes(files)) + ".dir"


def write_lock(outs: list[dict]) -> None:
    stages = {"artifacts": {"cmd": "true", "outs": outs}}
    Path("dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))


FILES = {"a.txt": b"alpha", "sub/b.bin": b"\x00beta"}


@pytest.fixture
def fetched(tmp_path, monkeypatch):
    """A workspace as `dvc pull` leaves it: results/ (FILES) in dvc.lock, every object in the cache."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    for rel, data in FILES.items():
        put(cache, data)
        (tmp_path / "results" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "results" / rel).write_bytes(data)
    oid = put(cache, manifest_bytes(FILES), dir_oid(FILES))
    write_lock([{"path": "results", "hash": "md5", "md5": oid}])
    return cache


def no_remote():
    raise AssertionError("the remote was asked although every object is in the cache")


class FakeRemote:
    """A remote object store as DVC's API gives it: oid -> content (absent: missing)."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects, self.fs = objects, self

    def oid_to_path(self, oid):
        return oid

    def exists(self, path):
        return path in self.objects

    def open(self, path, mode):
        return io.BytesIO(self.objects[path])


NAMED = "fetch_artifacts.sh: NOT AS RECORDED: "


def named(capsys) -> list[str]:
    """The problems a verification named on stderr."""
    return [line.removeprefix(NAMED) for line in capsys.readouterr().err.splitlines() if line.startswith(NAMED)]


def test_intact_fetch_passes(fetched, capsys):
    assert artifacts.verify_fetched(fetched, remote=no_remote) == 0
    assert "fetch_artifacts.sh: all 2 files of results have their recorded md5" in capsys.readouterr().err


def test_corrupted_copy_leaves_cache_and_workspace(fetched, capsys):
    bad = b"alphX"  # same size, other content
    put(fetched, bad, md5(FILES["a.txt"]))
    Path("results/a.txt").write_bytes(bad)
    assert artifacts.verify_fetched(fetched, remote=no_remote) == artifacts.NOT_AS_RECORDED
    (line,) = named(capsys)
    assert line.startswith("results/a.txt: corrupted: it arrived with md5 " + md5(bad))
    assert "removed from the DVC cache and from the workspace" in line
    assert not obj(fetched, md5(FILES["a.txt"])).exists() and not Path("results/a.txt").exists()
    assert Path("results/sub/b.bin").read_bytes() == FILES["sub/b.bin"]


def test_local_change_is_named_and_kept(fetched, capsys):
    Path("results/a.txt").write_bytes(b"edited")
    assert artifacts.verify_fetched(fetched, remote=no_remote) == 4
    (line,) = named(capsys)
    assert "differs from the recorded content" in line and "--force replaces it" in line
    assert Path("results/a.txt").read_bytes() == b"edited"


def test_files_not_checked_out(fetched, capsys):
    Path("results/sub/b.bin").unlink()
    assert artifacts.verify_fetched(fetched, remote=no_remote) == 4
    assert named(capsys) == ["results/sub/b.bin: not in the workspace"]
    # beside another failure, they are its consequence: summed up per out
    Path("results/a.txt").write_bytes(b"edited")
    assert artifacts.verify_fetched(fetched, remote=no_remote) == 4
    lines = named(capsys)
    assert len(lines) == 2 and lines[1].startswith("results/: 1 more file(s) not in the workspace")


@pytest.mark.parametrize(
    "held, why",
    [
        ("nothing", "missing in the remote"),
        (FILES["a.txt"], "not fetched, though the remote has it intact"),
        (b"other", f"corrupted in the remote (it has md5 {md5(b'other')}"),
        (None, "not fetched (missing or corrupted in the remote)"),  # no remote at hand
    ],
)
def test_absent_object_is_explained_by_the_remote(fetched, capsys, held, why):
    oid = md5(FILES["a.txt"])
    obj(fetched, oid).unlink()
    Path("results/a.txt").unlink()
    store = None if held is None else FakeRemote({} if held == "nothing" else {oid: held})
    assert artifacts.verify_fetched(fetched, remote=lambda: store) == 4
    (line,) = named(capsys)
    assert line.startswith(f"results/a.txt: {why}"), line


def test_failed_pull_points_at_dvcs_error(fetched, capsys):
    obj(fetched, md5(FILES["a.txt"])).unlink()
    Path("results/a.txt").write_bytes(b"stale")
    assert artifacts.verify_fetched(fetched, pull_failed=True, remote=lambda: None) == 4
    (line,) = named(capsys)
    assert line == (
        "results/a.txt: not fetched (missing or corrupted in the remote, see DVC's error above);"
        " the file in the workspace is not the recorded one either"
    )


def test_remote_is_asked_once(fetched, capsys):
    for rel in FILES:
        obj(fetched, md5(FILES[rel])).unlink()
        Path("results", rel).unlink()
    calls = []
    assert artifacts.verify_fetched(fetched, remote=lambda: calls.append(1)) == 4
    assert calls == [1] and len(named(capsys)) == 2


def test_corrupted_manifest_names_the_directory(fetched, capsys):
    oid = dir_oid(FILES)
    obj(fetched, oid).write_bytes(manifest_bytes(FILES).replace(b"sub/", b"suX/"))
    assert artifacts.verify_fetched(fetched, remote=no_remote) == 4
    (line,) = named(capsys)
    assert line.startswith(f"results/: its file list (DVC manifest {oid}) is corrupted (md5 ")
    assert "do not use them" in line and not obj(fetched, oid).exists()


def test_manifest_read_from_the_remote(fetched, capsys):
    oid = dir_oid(FILES)
    obj(fetched, oid).unlink()
    assert artifacts.verify_fetched(fetched, remote=lambda: FakeRemote({oid: manifest_bytes(FILES)})) == 0
    assert "all 2 files" in capsys.readouterr().err
    assert artifacts.verify_fetched(fetched, remote=lambda: FakeRemote({})) == 4
    assert "its file list (DVC manifest" in named(capsys)[0]


def test_single_file_out_and_dvc2_hash(fetched, capsys):
    put(fetched, b"lone")
    Path("lone.txt").write_bytes(b"lone")
    write_lock([{"path": "./lone.txt", "hash": "md5", "md5": md5(b"lone")}, {"path": "old", "md5": "abc"}])
    assert artifacts.verify_fetched(fetched, remote=no_remote) == 0
    err = capsys.readouterr().err
    assert "fetch_artifacts.sh: old is not checked (recorded with DVC 2's hash" in err
    assert "all 1 files of ./lone.txt, old have their recorded md5" in err


def test_long_lists_are_cut(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    many = {f"f{i:02d}": b"x%d" % i for i in range(12)}
    put(tmp_path / "cache", manifest_bytes(many), dir_oid(many))
    for name in many:
        put(tmp_path / "cache", many[name])
        Path("results").mkdir(exist_ok=True)
        Path("results", name).write_bytes(b"local")
    write_lock([{"path": "results", "hash": "md5", "md5": dir_oid(many)}])
    assert artifacts.verify_fetched(tmp_path / "cache", remote=no_remote) == 4
    lines = named(capsys)
    assert len(lines) == artifacts.SHOWN + 1 and lines[-1] == "... and 2 more"


# -- the run order ------------------------------------------------------------------------------


def record(key: str, root=".snakemake/metadata", split: int = 0, **fields) -> None:
    """A Snakemake metadata record for output ``key`` (its name split into an '@' directory)."""
    name = base64.urlsafe_b64encode(key.encode()).decode()
    path = Path(root) / (f"@{name[:split]}/{name[split:]}" if split else name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields))


def test_snakemake_path_decodes_split_names():
    key = "results/models/a/very/long/path"
    name = base64.urlsafe_b64encode(key.encode()).decode()
    assert snakemake_path(["@" + name[:8], name[8:]]) == key
    with pytest.raises(ValueError):
        snakemake_path(["not base64!"])


@pytest.fixture
def pulled(tmp_path, monkeypatch):
    """A pulled tree: data/in.txt (git) -> results/model (a directory, ended first) -> results/m.json;
    every file with a fresh, arbitrary timestamp."""
    monkeypatch.chdir(tmp_path)
    write_lock(
        [
            {"path": "results", "hash": "md5", "md5": "x.dir"},
            {"path": ".snakemake/metadata", "hash": "md5", "md5": "y.dir"},
        ]
    )
    Path("data").mkdir()
    Path("data/in.txt").write_text("input")
    Path("results/model").mkdir(parents=True)
    Path("results/model/w.bin").write_bytes(b"w")
    Path("results/model/.snakemake_timestamp").write_text("")
    Path("results/m.json").write_text("{}")
    sha = hashlib.sha256(b"input").hexdigest()
    record(
        "results/model", split=6, endtime=100.0, input=["data/in.txt"], input_checksums={"data/in.txt": f"sha256:{sha}"}
    )
    record("results/m.json", endtime=200.0, input=["results/model"])
    record("results/gone.json", endtime=300.0)  # a record of an output not pulled: ignored
    Path(".snakemake/metadata/not-a-record").write_text("{}")
    os.utime("data/in.txt", (1000.0, 1000.0))
    return tmp_path


def mtime(path) -> float:
    return os.stat(path).st_mtime


def test_run_order_restored(pulled, capsys):
    now = time.time()
    os.utime("results/m.json", (now + 50, now + 50))  # pulled "before" its input
    summary = artifacts.restore_run_order(now=now)
    assert summary == {"records": 2, "touched": 4, "changed": []}
    flag = "results/model/.snakemake_timestamp"
    assert mtime("data/in.txt") < mtime("results/model/w.bin") < mtime(flag) < mtime("results/m.json") < now
    assert mtime(flag) == pytest.approx(mtime("results/model/w.bin") + artifacts.STEP)
    assert "restored the run order of 2 recorded outputs (4 pulled paths under results)" in capsys.readouterr().err


def test_run_order_starts_after_newer_inputs(pulled):
    os.utime("data/in.txt", (5e9, 5e9))  # an input outside the pulled tree newer than now
    artifacts.restore_run_order(now=1e9)
    assert mtime("results/model/w.bin") == pytest.approx(5e9 + artifacts.STEP)


def test_output_of_changed_input_is_made_older(pulled, capsys):
    Path("data/in.txt").write_text("changed in git since")
    os.utime("data/in.txt", (1e9, 1e9))
    summary = artifacts.restore_run_order(now=2e9)
    assert summary["changed"] == ["results/model (input data/in.txt)"]
    assert mtime("results/model/.snakemake_timestamp") < mtime("data/in.txt")
    err = capsys.readouterr().err
    assert "made from other input content than the checkout's: results/model (input data/in.txt)" in err


# -- the verb and the scripts ------------------------------------------------------------------


def test_verb_exits_with_the_steps_status(fetched, monkeypatch, capsys):
    monkeypatch.setattr(artifacts, "dvc_remote", lambda name=None: None)
    Path("results/a.txt").write_bytes(b"edited")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["artifacts", "verify-fetched", "--cache", str(fetched), "--pull-status", "1"])
    assert exit_.value.code == 4 and len(named(capsys)) == 1
    Path("s.txt").write_text("no summary here\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["artifacts", "check-recordable", "--summary", "s.txt"])
    assert exit_.value.code == 1 and capsys.readouterr().out.startswith("cannot check the run: not the output of")


def test_verb_restores_the_run_order(pulled, capsys):
    cli.main(["artifacts", "restore-run-order"])
    assert "restored the run order of 2 recorded outputs" in capsys.readouterr().err


def test_scripts_hold_no_python():
    """The artifact scripts call package code: no heredoc, no inline program."""
    for script in SCRIPTS:
        text = script.read_text()
        assert not re.search(r"(?<!<)<<(?!<)", text), f"{script.name}: a heredoc"
        assert not re.search(r"python3?\"? +-(?!m )", text.replace('"$candidate" -c "import $2"', "")), (
            f"{script.name}: an inline Python program"
        )
