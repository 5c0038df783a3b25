#!/usr/bin/env bash
# Make the repository's SLURM profile findable as `snakemake --profile slurm`.
# Snakemake looks for a profile named `slurm` only in the working directory,
# ~/.config/snakemake/ and /etc/xdg/snakemake/; this links
#   ${XDG_CONFIG_HOME:-~/.config}/snakemake/slurm -> <repo>/workflow/profiles/slurm
# so edits to the tracked profile take effect at once. Idempotent; it never replaces a profile
# it did not make (a real directory, or a link elsewhere) unless given --force: it warns instead.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
src="$repo/workflow/profiles/slurm"
dest_dir="${XDG_CONFIG_HOME:-$HOME/.config}/snakemake"
dest="$dest_dir/slurm"
force=0
[ "${1:-}" = "--force" ] && force=1

[ -f "$src/config.yaml" ] || { echo "install_profile.sh: $src/config.yaml is missing" >&2; exit 1; }
mkdir -p "$dest_dir"
if [ -L "$dest" ] && [ "$(readlink "$dest")" = "$src" ]; then
  exit 0  # already installed
fi
if [ -L "$dest" ] && [ -f "$(readlink "$dest")/config.yaml" ] && \
  [[ "$(readlink "$dest")" == */workflow/profiles/slurm ]]; then
  rm -f "$dest"  # the profile of another unisparse checkout: the latest setup wins
elif [ -e "$dest" ] || [ -L "$dest" ]; then
  if [ "$force" = 1 ]; then
    if [ -L "$dest" ]; then rm -f "$dest"; else mv "$dest" "$dest.bak.$(date +%s)"; fi
  else
    echo "install_profile.sh: warning: $dest exists and is not a link to $src; keeping it," \
      "so 'snakemake --profile slurm' uses that one (rerun with --force to replace it; a directory" \
      "is moved aside), or use 'snakemake --profile workflow/profiles/slurm'" >&2
    exit 0
  fi
fi
ln -s "$src" "$dest"
echo "snakemake profile 'slurm' -> $src" >&2
