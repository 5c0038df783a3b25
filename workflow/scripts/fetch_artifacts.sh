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
#   --check            exit with status 3 if, after the fetch, Snakemake would still run a job
#
# What it does, and why (DESIGN.md section 7, "Known pitfalls"):
# 1. `dvc pull` restores both outs of dvc.yaml: the artifacts (results/) and Snakemake's provenance
#    records of them (.snakemake/metadata: params, rule code, input list and input checksums of each
#    output, as written by the run that produced them). With the records, Snakemake in this clone
#    compares the checked-out workflow and config against how each artifact was really made, so a
#    change is noticed, and an artifact that does not match the checkout is not silently accepted
#    (a blind `snakemake --touch` would record the checkout's params for it instead).
# 2. `dvc pull` writes files with fresh timestamps in arbitrary order, which Snakemake would read
#    as "input newer than output". The recorded outputs get timestamps in the order the producer's
#    run wrote them (the records' end times; 1 ms apart, just before now and after every input
#    outside the pulled tree), so Snakemake sees what it saw in the producer's checkout: an upstream
#    artifact remade after its consumers still looks newer. An input whose recorded checksum differs
#    from the file now in the checkout (e.g. a data file changed in git since the artifacts were
#    recorded) makes its consumer older than it. Any later rerun or edit gets a newer timestamp.
# 3. A dry run reports what would rerun: nothing when the checkout is the one the artifacts were
#    recorded with.
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
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "fetch_artifacts.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."

# the project's tools: the active environment, else the repository's .venv
if ! command -v dvc >/dev/null || ! command -v snakemake >/dev/null; then
  if [ -x .venv/bin/dvc ]; then PATH="$PWD/.venv/bin:$PATH"; else
    echo "fetch_artifacts.sh: dvc and snakemake are needed: run workflow/scripts/setup.sh and activate .venv" >&2
    exit 1
  fi
fi
# a Python with PyYAML: the one Snakemake runs on
python="$(command -v python3)"
for candidate in "$(dirname "$(command -v snakemake)")/python3" .venv/bin/python3; do
  if [ -x "$candidate" ] && "$candidate" -c "import yaml" 2>/dev/null; then python="$candidate"; break; fi
done
[ -f dvc.lock ] || { echo "fetch_artifacts.sh: no dvc.lock in this commit: no artifacts were recorded (see 'dvc commit')" >&2; exit 1; }
if compgen -G ".snakemake/locks/*.lock" >/dev/null; then
  echo "fetch_artifacts.sh: a Snakemake run holds locks in .snakemake/locks; let it finish (or 'snakemake --unlock') first" >&2
  exit 1
fi

echo "fetch_artifacts.sh: dvc pull ${remote[*]} ${jobs[*]} ${force[*]}" >&2
dvc pull "${remote[@]}" "${jobs[@]}" "${force[@]}"

# 2. timestamps in the order the producer's run made them (see the header)
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

# 3. what would still run (nothing, when the checkout is the one the artifacts were recorded with)
summary="$(snakemake -n --quiet rules "${configfile[@]}" 2>&1)" || { echo "$summary" >&2; exit 1; }
if grep -q "^Job stats:" <<<"$summary"; then
  echo "fetch_artifacts.sh: fetched; with this checkout and config ${configfile[*]:-(the default)}, Snakemake would still run:" >&2
  awk '/^Job stats:/ {p = 1} p {print} p && /^total/ {exit}' <<<"$summary" >&2
  echo "fetch_artifacts.sh: reasons: snakemake -n -r ${configfile[*]}" >&2
  [ "$check" = 1 ] && exit 3
else
  echo "fetch_artifacts.sh: fetched; Snakemake has nothing to do ${configfile[*]}" >&2
fi
