#!/usr/bin/env bash
# Record the artifacts of a finished Snakemake run in dvc.lock and push them to the DVC remote: the
# one documented way to run `dvc commit` and `dvc push` in this repository.
#
#   bash workflow/scripts/record_artifacts.sh [--configfile FILE] [--remote NAME] [--no-push]
#
#   --configfile FILE  the config the run was made with (default: the Snakefile's default); the run
#                      must be complete for it: `snakemake -n --configfile FILE` has nothing to do
#   --remote NAME      DVC remote to push to (default: the configured default remote)
#   --no-push          record in dvc.lock and the local cache only (push later: `dvc push`)
#
# Refuses (exit status 1, one line saying why) and records nothing while
#   - a Snakemake run is in progress: it holds locks in .snakemake/locks (a killed run leaves them
#     behind: `snakemake --unlock` removes them once no run is left),
#   - the last run was interrupted: .snakemake/incomplete holds markers of outputs a job had begun
#     (rerun with --rerun-incomplete: Snakemake redoes them),
#   - the run is incomplete: a dry run with the config would still run jobs.
# A bare `dvc commit -f` checks none of these: during a run it records whatever is there at that
# moment (e.g. 45 of 49 files, some half written) and exits 0.
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
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
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

# the outputs Snakemake marked as begun but not finished (file names: urlsafe base64 of the path,
# split into '@'-prefixed directories when longer than a file name may be)
incomplete_outputs() {
  [ -d .snakemake/incomplete ] || return 0
  find .snakemake/incomplete -type f | sort | while IFS= read -r marker; do
    rel="${marker#.snakemake/incomplete/}"
    sed -E 's#(^|/)@#\1#g' <<<"$rel" | tr -d '/\n' | tr '_-' '/+' | base64 -d 2>/dev/null || printf '%s' "$rel"
    echo
  done
}

unsafe_state() {
  if compgen -G ".snakemake/locks/*.lock" >/dev/null; then
    echo "a Snakemake run is in progress (it holds locks in .snakemake/locks); let it finish and record then (if it was killed: 'snakemake --unlock', then complete the run)"
    return
  fi
  local outputs
  outputs="$(incomplete_outputs)"
  if [ -n "$outputs" ]; then
    local n
    n="$(wc -l <<<"$outputs")"
    echo "the last Snakemake run was interrupted: $n output(s) begun but not finished ($(head -3 <<<"$outputs" | paste -sd' ')$([ "$n" -gt 3 ] && echo ' ...')) are marked in .snakemake/incomplete; complete the run first: snakemake --cores all --rerun-incomplete$config_args"
  fi
}

[ -f dvc.yaml ] || refuse "no dvc.yaml in $PWD"
reason="$(unsafe_state)"
[ -z "$reason" ] || refuse "$reason"

# complete: a dry run with the run's config has nothing to do
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
backup="$(mktemp)"
trap 'rm -f "$backup"' EXIT
had_lock=0
if [ -f dvc.lock ]; then cp -p dvc.lock "$backup"; had_lock=1; fi
echo "record_artifacts.sh: dvc commit -f" >&2
dvc commit -f
reason="$(unsafe_state)"
if [ -n "$reason" ]; then
  if [ "$had_lock" = 1 ]; then cp -p "$backup" dvc.lock; else rm -f dvc.lock; fi
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
