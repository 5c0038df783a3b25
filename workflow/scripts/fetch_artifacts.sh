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
# What it does, and why (docs/artifacts.md, "Why the artifacts travel with Snakemake's metadata"):
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
# a Python with this package (its `unisparse artifacts` steps): the one Snakemake runs on
find_python fetch_artifacts.sh unisparse.artifacts
[ -f dvc.lock ] || { echo "fetch_artifacts.sh: no dvc.lock in this commit: no artifacts were recorded (see 'dvc commit')" >&2; exit 1; }
if compgen -G ".snakemake/locks/*.lock" >/dev/null; then
  echo "fetch_artifacts.sh: a Snakemake run holds locks in .snakemake/locks; let it finish (or 'snakemake --unlock') first" >&2
  exit 1
fi

echo "fetch_artifacts.sh: dvc pull ${remote[*]} ${jobs[*]} ${force[*]}" >&2
pull_rc=0
dvc pull "${remote[@]}" "${jobs[@]}" "${force[@]}" || pull_rc=$?

# 2. every file is the recorded one (see the header; unisparse.artifacts)
cache="$(dvc cache dir)"
check_rc=0
"$python" -m unisparse artifacts verify-fetched --cache "$cache" --pull-status "$pull_rc" "${remote[@]}" || check_rc=$?
if [ "$check_rc" != 0 ]; then exit "$check_rc"; fi
if [ "$pull_rc" != 0 ]; then
  echo "fetch_artifacts.sh: dvc pull failed (above)" >&2
  exit "$pull_rc"
fi

# 3. timestamps in the order the producer's run made them (see the header; unisparse.artifacts)
"$python" -m unisparse artifacts restore-run-order

# 4. what would still run (nothing, when the checkout is the one the artifacts were recorded with),
# and what is missing although nothing would run (an intermediate absent from the recording, which
# Snakemake does not rebuild while its consumers are up to date: unisparse.records)
config_args="$([ ${#configfile[@]} -eq 0 ] || printf ' %q' "${configfile[@]}")"
incomplete=0
listed="$(snakemake --summary "${configfile[@]}" 2>&1)" || { echo "$listed" >&2; exit 1; }
missing="$("$python" -m unisparse artifacts check-recordable --summary /dev/stdin --config-args "$config_args" <<<"$listed" 2>/dev/null)" || incomplete=1
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
