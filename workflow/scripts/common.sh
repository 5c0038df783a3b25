# Shared by the artifact scripts (sourced after `cd` to the repository root).

# require_tools SCRIPT: put dvc and snakemake on PATH (the active environment, else the repository's
# .venv), or stop with a message naming SCRIPT.
require_tools() {
  if ! command -v dvc >/dev/null || ! command -v snakemake >/dev/null; then
    if [ -x .venv/bin/dvc ]; then PATH="$PWD/.venv/bin:$PATH"; else
      echo "$1: dvc and snakemake are needed: run workflow/scripts/setup.sh and activate .venv" >&2
      exit 1
    fi
  fi
}
