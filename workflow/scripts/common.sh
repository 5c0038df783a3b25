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

# find_python SCRIPT MODULE: set $python to a Python that imports MODULE: the one Snakemake runs on,
# else .venv's, else python3 (the first that can), or stop with a message naming SCRIPT.
find_python() {
  python=""
  for candidate in "$(dirname "$(command -v snakemake)")/python3" .venv/bin/python3 "$(command -v python3 || true)"; do
    if [ -x "$candidate" ] && "$candidate" -c "import $2" 2>/dev/null; then python="$candidate"; return; fi
  done
  echo "$1: no Python that imports $2: run workflow/scripts/setup.sh and activate .venv" >&2
  exit 1
}
