#!/usr/bin/env bash
# Record the artifacts of a finished Snakemake run in dvc.lock and push them to the DVC remote: the
# one documented way to run `dvc commit` and `dvc push` in this repository.
#
#   bash workflow/scripts/record_artifacts.sh [--configfile FILE] [--remote NAME] [--no-push]
#
#   --configfile FILE  the config the run was made with (default: the Snakefile's default); the run
#                      must be complete for it: every output its workflow expects exists, and
#                      `snakemake -n --configfile FILE` has nothing to do
#   --remote NAME      DVC remote to push to (default: the configured default remote)
#   --no-push          record in dvc.lock and the local cache only (push later: `dvc push`)
#
# Refuses (exit status 1, one line saying why and the command that clears it) and records nothing while
#   - a Snakemake run is in progress: it holds locks in .snakemake/locks (a killed run leaves them
#     behind: `snakemake --unlock` removes them once no run is left),
#   - the last run was interrupted: an output that exists is marked in .snakemake/incomplete as begun
#     and not finished (rerun with --rerun-incomplete: Snakemake redoes it; a marker whose output is
#     gone is ignored by Snakemake, and that output is named as missing, below),
#   - an output the workflow expects is missing (`snakemake --summary` lists every output of the DAG):
#     Snakemake does not rebuild a deleted intermediate whose consumers are up to date, so a dry run
#     says "nothing to do" without it (e.g. results/models/dense deleted, or a job killed while its
#     rerun had removed its old outputs); rebuilt with `snakemake --cores all --forcerun PATH...`,
#     which also reruns what was made from it; likewise a file a model directory's SHA256SUMS lists,
#   - the run is incomplete: a dry run with the config would still run jobs.
# A bare `dvc commit -f` checks none of these: during a run it records whatever is there at that
# moment (e.g. 45 of 49 files, some half written) and exits 0. Temporaries a killed writer left
# (results/**/.NAME.tmp-*) are never recorded (.dvcignore) and only noted.
# Then: `dvc commit -f` (results/ and .snakemake/metadata into dvc.lock and the DVC cache), checks
# again that no run started meanwhile (else dvc.lock is put back), `dvc push`, and a reminder to
# `git add dvc.lock` and commit it together with the checkout the artifacts were made with.
set -euo pipefail

configfile=() remote=() push=1
while [ $# -gt 0 ]; do
  case "$1" in
    --configfile) configfile=(--configfile "$(realpath -m "$2")"); shift 2 ;;
    --configfile=*) configfile=(--configfile "$(realpath -m "${1#*=}")"); shift ;;
    --remote|-r) remote=(--remote "$2"); shift 2 ;;
    --remote=*) remote=(--remote "${1#*=}"); shift ;;
    --no-push) push=0; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "record_artifacts.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."

# shellcheck source=workflow/scripts/common.sh
. workflow/scripts/common.sh
require_tools record_artifacts.sh
config_text="${configfile[1]:-the default config}"
config_args=""
[ ${#configfile[@]} -eq 0 ] || config_args="$(printf ' %q' "${configfile[@]}")"

refuse() { echo "record_artifacts.sh: not recording: $*" >&2; exit 1; }
find_python record_artifacts.sh unisparse.artifacts  # the package with its `unisparse artifacts` steps

in_progress() {
  if compgen -G ".snakemake/locks/*.lock" >/dev/null; then
    echo "a Snakemake run is in progress (it holds locks in .snakemake/locks): let it finish and record then; if it was killed, remove its locks first: snakemake --unlock$config_args"
  fi
}
markers() { find .snakemake/incomplete -type f 2>/dev/null | sort; }

[ -f dvc.yaml ] || refuse "no dvc.yaml in $PWD"
reason="$(in_progress)"
[ -z "$reason" ] || refuse "$reason"

# complete: every output the DAG expects exists and no marked output is half written (unisparse.records) ...
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
snakemake --summary "${configfile[@]}" >"$scratch/summary" 2>"$scratch/summary.err" || {
  cat "$scratch/summary" "$scratch/summary.err" >&2
  refuse "listing the workflow's outputs ('snakemake --summary$config_args') failed (above)"
}
check_rc=0
reason="$("$python" -m unisparse artifacts check-recordable --summary "$scratch/summary" --config-args "$config_args")" || check_rc=$?
[ "$check_rc" = 0 ] || refuse "${reason:-the completeness check failed (exit status $check_rc)}"

# ... and a dry run with the run's config has nothing to do
summary="$(snakemake -n --quiet rules "${configfile[@]}" 2>&1)" || {
  echo "$summary" >&2
  refuse "the dry run 'snakemake -n$config_args' failed (above)"
}
if grep -q "^Job stats:" <<<"$summary"; then
  jobs="$(awk '/^Job stats:/ {p = 1; next} p && /^total/ {print "total " $2; exit} p && NF == 2 && $2 ~ /^[0-9]+$/ {print $1 " " $2}' <<<"$summary")"
  total="$(sed -n 's/^total //p' <<<"$jobs")"
  rules="$(grep -v '^total ' <<<"$jobs" | head -6 | paste -sd, | sed 's/,/, /g')"
  [ "$(grep -vc '^total ' <<<"$jobs")" -le 6 ] || rules="$rules, ..."
  refuse "the run is incomplete: with $config_text Snakemake would still run ${total:-some} job(s) (${rules}); complete it (snakemake --cores all$config_args; reasons: snakemake -n$config_args), or pass the --configfile it was made with"
fi

# record; put dvc.lock back if a run started meanwhile (it may have changed files being recorded)
had_lock=0
if [ -f dvc.lock ]; then cp -p dvc.lock "$scratch/dvc.lock"; had_lock=1; fi
before="$(markers)"
echo "record_artifacts.sh: dvc commit -f" >&2
dvc commit -f
reason="$(in_progress)"
[ -n "$reason" ] || [ "$(markers)" = "$before" ] || reason="a Snakemake job started (new markers in .snakemake/incomplete)"
if [ -n "$reason" ]; then
  if [ "$had_lock" = 1 ]; then cp -p "$scratch/dvc.lock" dvc.lock; else rm -f dvc.lock; fi
  refuse "$reason (it started during 'dvc commit'; dvc.lock is as before)"
fi

if [ "$push" = 1 ]; then
  echo "record_artifacts.sh: dvc push ${remote[*]}" >&2
  dvc push "${remote[@]}"
  pushed=" and pushed them"
else
  pushed=" (not pushed: 'dvc push${remote[*]:+ ${remote[*]}}' shares them)"
fi
echo "record_artifacts.sh: recorded the artifacts of the run with $config_text in dvc.lock$pushed; now commit dvc.lock with the checkout they were made with: git add dvc.lock && git commit" >&2
if command -v git >/dev/null && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  changed="$(git status --porcelain --untracked-files=no -- . ':!dvc.lock' 2>/dev/null | cut -c4-)" || changed=""
  [ -z "$changed" ] || echo "record_artifacts.sh: note: tracked files have uncommitted changes ($(head -3 <<<"$changed" | paste -sd' ')$([ "$(wc -l <<<"$changed")" -gt 3 ] && echo ' ...')); the artifacts were made with them: commit them together with dvc.lock" >&2
fi
