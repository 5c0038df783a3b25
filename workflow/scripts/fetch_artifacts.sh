#!/usr/bin/env bash
# Fetch the artifacts recorded in dvc.lock into this checkout so that Snakemake reruns nothing that
# is up to date and still notices any later change of params, rule code or input.
#
#   bash workflow/scripts/fetch_artifacts.sh [--configfile FILE] [--remote NAME] [--jobs N] [--force] [--check]
#
#   --configfile FILE  the config the artifacts were made with (default: the Snakefile's default);
#                      only used for the closing dry run that reports what, if anything, would rerun
#   --remote NAME      DVC remote to pull from (default: the configured default remote)
#   --jobs N           parallel downloads (dvc pull -j)
#   --force            overwrite local changes to results/ (dvc pull --force)
#   --check            exit with status 3 if, after the fetch, Snakemake would still run a job or an
#                      output the workflow expects is missing (named, with the command that rebuilds it)
#
# Exit status 4: a file did not arrive as recorded (corrupted or missing in the remote): each one is
# named by its path in the workspace, and its corrupted copy is removed from results/ (or .snakemake/
# metadata) and the DVC cache; a corrupted directory manifest names the whole directory.
#
# What it does, and why (DESIGN.md section 7, "Known pitfalls"):
# 1. `dvc pull` restores both outs of dvc.yaml: the artifacts (results/) and Snakemake's provenance
#    records of them (.snakemake/metadata: params, rule code, input list and input checksums of each
#    output, as written by the run that produced them). With the records, Snakemake in this clone
#    compares the checked-out workflow and config against how each artifact was really made, so a
#    change is noticed, and an artifact that does not match the checkout is not silently accepted
#    (a blind `snakemake --touch` would record the checkout's params for it instead).
# 2. Every file of the outs in dvc.lock is checked against the md5 that DVC's directory manifest
#    (the .dir object, from the DVC cache or else the remote) records for it. DVC alone is not
#    enough: without the remote's `verify` option a corrupted object in the remote lands in the
#    cache and the workspace and `dvc pull` exits 0; with `verify = true` (the default remote's
#    setting in .dvc/config) DVC deletes a corrupted object after downloading it, fails with only
#    "Checkout failed for following targets: results", removes all of results/, and still checks
#    out a corrupted manifest's (wrong) file list with exit status 0. Each file that differs or is
#    missing is named; a corrupted copy is removed from the DVC cache (so that a repaired remote
#    is fetched from again) and from the workspace; one that is not in the cache is looked up in
#    the remote (DVC's Python API) to tell "missing" from "corrupted"; the script then exits with 4.
# 3. `dvc pull` writes files with fresh timestamps in arbitrary order, which Snakemake would read
#    as "input newer than output". The recorded outputs get timestamps in the order the producer's
#    run wrote them (the records' end times; 1 ms apart, just before now and after every input
#    outside the pulled tree), so Snakemake sees what it saw in the producer's checkout: an upstream
#    artifact remade after its consumers still looks newer. An input whose recorded checksum differs
#    from the file now in the checkout (e.g. a data file changed in git since the artifacts were
#    recorded) makes its consumer older than it. Any later rerun or edit gets a newer timestamp.
# 4. A dry run reports what would rerun: nothing when the checkout is the one the artifacts were
#    recorded with; otherwise the jobs, and the command that prints each one's reason.
set -euo pipefail

configfile=() remote=() jobs=() force=() check=0
while [ $# -gt 0 ]; do
  case "$1" in
    --configfile) configfile=(--configfile "$(realpath -m "$2")"); shift 2 ;;
    --configfile=*) configfile=(--configfile "$(realpath -m "${1#*=}")"); shift ;;
    --remote|-r) remote=(--remote "$2"); shift 2 ;;
    --jobs|-j) jobs=(--jobs "$2"); shift 2 ;;
    --force|-f) force=(--force); shift ;;
    --check) check=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "fetch_artifacts.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."

# shellcheck source=workflow/scripts/common.sh
. workflow/scripts/common.sh
require_tools fetch_artifacts.sh
# a Python with PyYAML and this package (the completeness check): the one Snakemake runs on
find_python fetch_artifacts.sh "yaml, unisparse.records"
[ -f dvc.lock ] || { echo "fetch_artifacts.sh: no dvc.lock in this commit: no artifacts were recorded (see 'dvc commit')" >&2; exit 1; }
if compgen -G ".snakemake/locks/*.lock" >/dev/null; then
  echo "fetch_artifacts.sh: a Snakemake run holds locks in .snakemake/locks; let it finish (or 'snakemake --unlock') first" >&2
  exit 1
fi

echo "fetch_artifacts.sh: dvc pull ${remote[*]} ${jobs[*]} ${force[*]}" >&2
pull_rc=0
dvc pull "${remote[@]}" "${jobs[@]}" "${force[@]}" || pull_rc=$?

# 2. every file is the recorded one (see the header)
cache="$(dvc cache dir)"
check_rc=0
"$python" - "$cache" "$pull_rc" "${remote[@]:1}" <<'PY' || check_rc=$?
import hashlib, json, os, sys
import yaml

cache, pull_rc, remote_name = sys.argv[1], int(sys.argv[2]), (sys.argv[3:] or [None])[0]
SHOWN = 10  # problems listed in full


def md5_of(chunks):
    h = hashlib.md5()
    for block in chunks:
        h.update(block)
    return h.hexdigest()


def md5sum(path):
    with open(path, "rb") as f:
        return md5_of(iter(lambda: f.read(1 << 20), b""))


def obj(oid):
    return os.path.join(cache, "files", "md5", oid[:2], oid[2:])


def intact(oid, digest):
    return digest == oid.split(".")[0]  # a manifest's oid is the md5 of its content + ".dir"


states = {}


def state(oid):
    """The cached object of `oid`: 'ok', 'absent', or the md5 of its corrupted content (which is
    then removed from the cache, so that the next fetch downloads it again)."""
    if oid not in states:
        path = obj(oid)
        states[oid] = "absent"
        if os.path.isfile(path):
            actual = md5sum(path)
            states[oid] = "ok" if intact(oid, actual) else actual
            if not intact(oid, actual):
                os.remove(path)
    return states[oid]


_remote = []


def remote_odb():
    """The remote's object store, through DVC's Python API (None where that is not at hand)."""
    if not _remote:
        try:
            from dvc.repo import Repo
            _remote.append(Repo(".").cloud.get_remote_odb(remote_name, "fetch"))
        except Exception:
            _remote.append(None)
    return _remote[0]


def in_remote(oid):
    """('missing' | 'ok' | md5 of a corrupted copy | None when unknown, content when it is a manifest)."""
    odb = remote_odb()
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
            actual = md5_of(iter(lambda: f.read(1 << 20), b""))
        return ("ok" if intact(oid, actual) else actual), None
    except Exception:
        return None, None


def why_absent(oid, found):
    if found == "missing":
        return "missing in the remote"
    if found == "ok":
        return "not fetched, though the remote has it intact (a download error? fetch again)"
    if found:
        return f"corrupted in the remote (it has md5 {found}, recorded is {oid}; DVC's verify refused it)"
    return "not fetched (missing or corrupted in the remote" + (", see DVC's error above)" if pull_rc else ")")


problems, unpulled, checked = [], {}, 0


def check(path, want, out):
    global checked
    checked += 1
    have = md5sum(path) if os.path.isfile(path) else None
    if have == want:
        return
    cached = state(want)
    if cached == "ok":
        if have is None:
            unpulled.setdefault(out, []).append(path)
        else:
            problems.append(f"{path}: differs from the recorded content (md5 {have}, recorded {want});"
                            " DVC did not overwrite it (a local change? --force replaces it)")
    elif cached == "absent":
        stale = "; the file in the workspace is not the recorded one either" if have else ""
        problems.append(f"{path}: {why_absent(want, in_remote(want)[0])}{stale}")
    else:
        gone = ""
        if have == cached:
            os.remove(path)
            gone = " and from the workspace"
        problems.append(f"{path}: corrupted: it arrived with md5 {cached}, recorded is {want}"
                        f" (removed from the DVC cache{gone})")


with open("dvc.lock") as f:
    lock = yaml.safe_load(f)
outs = [o for stage in (lock.get("stages") or {}).values() for o in stage.get("outs") or []]
for out in outs:
    path, oid = os.path.normpath(out["path"]), out.get("md5")
    if out.get("hash") != "md5" or not oid:
        print(f"fetch_artifacts.sh: {path} is not checked (recorded with DVC 2's hash;"
              " record the artifacts again with DVC 3)", file=sys.stderr)
        continue
    if not oid.endswith(".dir"):
        check(path, oid, path)
        continue
    manifest = state(oid)
    content = None
    if manifest == "ok":
        with open(obj(oid), "rb") as f:
            content = f.read()
    else:  # not in the cache: read it from the remote, where it is intact
        found, content = in_remote(oid) if manifest == "absent" else ("corrupted", None)
        if found != "ok":
            why = why_absent(oid, found) if manifest == "absent" else f"corrupted (md5 {manifest}; removed from the DVC cache)"
            problems.append(f"{path}/: its file list (DVC manifest {oid}) is {why}: none of its files can be"
                            f" checked, and what DVC put in {path}/ may be the wrong files: do not use them")
            continue
    for entry in json.loads(content):
        check(os.path.join(path, entry["relpath"]), entry["md5"], path)

for out, paths in unpulled.items():
    if problems:
        problems.append(f"{out}/: {len(paths)} more file(s) not in the workspace, not checked out because of the"
                        f" failure above: {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}")
    else:
        problems += [f"{p}: not in the workspace" for p in paths]
if problems:
    for line in problems[:SHOWN] + ([f"... and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else []):
        print(f"fetch_artifacts.sh: NOT AS RECORDED: {line}", file=sys.stderr)
    print("fetch_artifacts.sh: the files named above are not the recorded artifacts; repair the remote (push"
          " them again from a checkout that has them: bash workflow/scripts/record_artifacts.sh) and fetch again",
          file=sys.stderr)
    sys.exit(4)
print(f"fetch_artifacts.sh: all {checked} files of {', '.join(o['path'] for o in outs)} have their recorded md5",
      file=sys.stderr)
PY
if [ "$check_rc" != 0 ]; then exit "$check_rc"; fi
if [ "$pull_rc" != 0 ]; then
  echo "fetch_artifacts.sh: dvc pull failed (above)" >&2
  exit "$pull_rc"
fi

# 3. timestamps in the order the producer's run made them (see the header)
"$python" - <<'PY'
import base64, hashlib, json, os, sys, time
import yaml

STEP = 0.001  # seconds between consecutive outputs; file systems keep at least this resolution

with open("dvc.lock") as f:
    lock = yaml.safe_load(f)
outs = sorted({o["path"] for stage in lock.get("stages", {}).values() for o in stage.get("outs", [])})


def under(path, roots):
    path = os.path.normpath(path)
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def records(root=".snakemake/metadata"):
    """Snakemake's file-backed metadata records: output path -> record (JSON)."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            parts = os.path.relpath(full, root).split(os.sep)
            encoded = "".join(p[1:] if p.startswith("@") else p for p in parts)
            try:
                with open(full) as f:
                    found[base64.urlsafe_b64decode(encoded).decode()] = json.load(f)
            except (ValueError, UnicodeDecodeError):
                continue
    return found


def carrier(path):
    """The file whose mtime Snakemake reads for an output (a directory's .snakemake_timestamp)."""
    flag = os.path.join(path, ".snakemake_timestamp")
    return flag if os.path.isdir(path) and os.path.exists(flag) else path


def same_content(path, checksum):
    algorithm, _, digest = checksum.rpartition(":")
    h = hashlib.new(algorithm or "sha256")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() == digest


data_outs = [o for o in outs if not under(o, [".snakemake"])]
recs = {k: r for k, r in records().items() if under(k, data_outs) and os.path.exists(k)}
external = {i for r in recs.values() for i in (r.get("input") or []) if not under(i, data_outs)}
# the producer's order of outputs (a job's outputs end after its inputs), no gaps kept
order = sorted({r.get("endtime") or 0.0 for r in recs.values()})
rank = {t: i for i, t in enumerate(order)}
newest_external = max([os.stat(i).st_mtime for i in external if os.path.exists(i)], default=0.0)
start = max(time.time() - (len(order) + 1) * STEP, newest_external + STEP)

touched = 0
for out in data_outs:  # everything pulled first gets the oldest stamp ...
    if os.path.exists(out):
        for dirpath, dirs, files in os.walk(out, topdown=False):
            for name in files + dirs:
                os.utime(os.path.join(dirpath, name), (start, start), follow_symlinks=False)
                touched += 1
        os.utime(out, (start, start))
stamps = {k: start + (1 + rank[r.get("endtime") or 0.0]) * STEP for k, r in recs.items()}
for key, stamp in stamps.items():  # ... then each recorded output its place in the run's order
    os.utime(carrier(key), (stamp, stamp), follow_symlinks=False)
# an input whose content differs from the one the output was made from (a file changed in git
# since the artifacts were recorded, or an upstream artifact remade without its consumers):
# make the output older than that input, as it would be in the producer's checkout
changed = []
for key, r in recs.items():
    for path, checksum in (r.get("input_checksums") or {}).items():
        if os.path.isfile(path) and checksum and not same_content(path, checksum):
            older = os.stat(carrier(path)).st_mtime - STEP
            if older < os.stat(carrier(key)).st_mtime:
                os.utime(carrier(key), (older, older), follow_symlinks=False)
            changed.append(f"{key} (input {path})")
print(f"fetch_artifacts.sh: restored the run order of {len(recs)} recorded outputs"
      f" ({touched} pulled paths under {', '.join(data_outs)})", file=sys.stderr)
for line in changed:
    print(f"fetch_artifacts.sh: made from other input content than the checkout's: {line}", file=sys.stderr)
PY

# 4. what would still run (nothing, when the checkout is the one the artifacts were recorded with),
# and what is missing although nothing would run (an intermediate absent from the recording, which
# Snakemake does not rebuild while its consumers are up to date: unisparse.records)
config_args="$([ ${#configfile[@]} -eq 0 ] || printf ' %q' "${configfile[@]}")"
incomplete=0
listed="$(snakemake --summary "${configfile[@]}" 2>&1)" || { echo "$listed" >&2; exit 1; }
missing="$("$python" -m unisparse.records check --summary /dev/stdin --config-args "$config_args" <<<"$listed" 2>/dev/null)" || incomplete=1
summary="$(snakemake -n --quiet rules "${configfile[@]}" 2>&1)" || { echo "$summary" >&2; exit 1; }
if grep -q "^Job stats:" <<<"$summary"; then
  echo "fetch_artifacts.sh: fetched; with this checkout and config ${configfile[*]:-(the default)}, Snakemake would still run:" >&2
  awk '/^Job stats:/ {p = 1} p {print} p && /^total/ {exit}' <<<"$summary" >&2
  # a plain dry run lists each job with its reason (Snakemake 9 has no -r/--reason any more)
  echo "fetch_artifacts.sh: reasons: snakemake -n$config_args" >&2
  incomplete=1
elif [ "$incomplete" = 0 ]; then
  echo "fetch_artifacts.sh: fetched; Snakemake has nothing to do ${configfile[*]}" >&2
fi
if [ -n "$missing" ]; then echo "fetch_artifacts.sh: fetched, but the recorded run is not complete: $missing" >&2; fi
if [ "$check" = 1 ] && [ "$incomplete" = 1 ]; then exit 3; fi
