#!/usr/bin/env bash
# Regenerate the figures committed for the README (notebooks/figures/*.png).
#
#   workflow/scripts/update_readme_figures.sh [snakemake options]     e.g. --cores 4
#
# Runs the default pipeline (the embedded tiny model, workflow/config/tiny.yaml) up to its figure
# target `figures` (rules/figures.smk), then replaces the PNGs in notebooks/figures/ by the PNGs of
# every figure family that the default config makes. Options are passed to the building Snakemake
# call only (default: --cores all); do not pass --configfile: the README shows the default pipeline.
# Commit notebooks/figures/ afterwards; the executed notebooks stay in logs/figures/.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -x .venv/bin/snakemake ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
export MPLBACKEND=Agg

if [ "$#" -eq 0 ]; then
  set -- --cores all
fi
snakemake figures "$@"

# the PNGs that the figure rules of this DAG write (the summary is tab-separated: file, date, rule, ...)
mapfile -t pngs < <(snakemake figures --summary 2>/dev/null | awk -F'\t' '$3 ~ /_figure$/ && $1 ~ /\.png$/ {print $1}')
if [ "${#pngs[@]}" -eq 0 ]; then
  echo "update_readme_figures: the default config makes no figures" >&2
  exit 1
fi

mkdir -p notebooks/figures
rm -f notebooks/figures/*.png
for png in "${pngs[@]}"; do
  if [ ! -s "$png" ]; then
    echo "update_readme_figures: $png is missing or empty" >&2
    exit 1
  fi
  cp "$png" notebooks/figures/
  echo "notebooks/figures/$(basename "$png")"
done
