#!/usr/bin/env bash
# Set up a fresh machine for unisparse: a virtual environment in .venv with the package, the
# workflow tools and the test tools. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned: 2.13.0 (CPU) lies on the project's machines as a local wheel; an unpinned
# torch would pull several GB of CUDA wheels.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[workflow,test,qwen]"
# make `snakemake --profile slurm` find the repo's profile (~/.config/snakemake/slurm)
bash workflow/scripts/install_profile.sh
echo "unisparse environment ready: . .venv/bin/activate" >&2
