"""Whether a Snakemake run is complete enough to be recorded (workflow/scripts/record_artifacts.sh).

``snakemake -n`` having nothing to do is not enough: Snakemake rebuilds a missing output only when
some job that has to run asks for it, so a deleted intermediate (the dense model, a calibration
file, a width model) whose consumers are up to date is never rebuilt, and a dry run says nothing
to do. A recording of such a run lacks a file that every later stage was made from, and a consumer
fetches it with "nothing to do". The check here reads ``snakemake --summary`` (every output file of
the target's DAG, with its status and whether a job is planned for it) and refuses, naming each output
that is missing with no job planned, with the one command that rebuilds it and what was made from it
(``--forcerun``). It also tells the markers of an interrupted job apart (.snakemake/incomplete):
Snakemake reruns (``--rerun-incomplete``) a marked output that exists, and ignores the marker of one
that is missing; so a killed job whose consumers are up to date is named as missing, not as
"interrupted", and advice that Snakemake would ignore is never given.

Run by the scripts as ``unisparse artifacts check-recordable --summary FILE [--config-args ' --configfile X']``
(also ``python -m unisparse.records check ...``): exit status 1 and one line (on stdout) saying why
not, or 0; notes go to stderr.
"""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import sys
from pathlib import Path

#: the header ``snakemake --summary`` prints before its rows (tab-separated)
SUMMARY_HEADER = ("output_file", "date", "rule", "log-file(s)", "status", "plan")
#: statuses of an output that is absent on purpose (temp, pipe, ...): only "missing" is a gap
MISSING = "missing"
#: what ``atomic_path`` (unisparse.io) names its temporaries and moved-aside copies: ``.<name>.tmp-*``,
#: ``.<name>.old-.<name>.tmp-*``; .dvcignore keeps them out of a recording
TEMPORARY_MARK = ".tmp-"
SHOWN = 6  # paths named in one line before "..."


def summary_rows(text: str) -> list[dict]:
    """The rows of ``snakemake --summary`` output as dicts keyed by ``SUMMARY_HEADER``; other lines
    (Snakemake's log, the workflow's own messages) are skipped. No header: a ``ValueError``."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if tuple(line.split("\t")) == SUMMARY_HEADER)
    except StopIteration:
        raise ValueError(
            "not the output of 'snakemake --summary': no header line " + "\\t".join(SUMMARY_HEADER)
        ) from None
    rows = []
    for line in lines[start + 1 :]:
        fields = line.split("\t")
        if len(fields) == len(SUMMARY_HEADER):
            rows.append(dict(zip(SUMMARY_HEADER, fields)))
    return rows


def missing_outputs(rows) -> list[str]:
    """Outputs of the DAG that do not exist although no job is planned to make them."""
    return sorted({r["output_file"] for r in rows if r["status"] == MISSING and r["plan"] == "no update"})


def _manifest_gaps(path: Path) -> list[str]:
    """Files a directory output's ``SHA256SUMS`` lists that are not there (no hashing: cheap)."""
    from .io import MANIFEST, manifest_entries

    if not (path / MANIFEST).is_file():
        return []
    return [f"{path.as_posix()}/{name}" for name in sorted(manifest_entries(path)) if not (path / name).is_file()]


def incomplete_gaps(rows) -> dict[str, list[str]]:
    """``{output: files missing from it}`` for directory outputs that exist without every file their
    ``SHA256SUMS`` lists (a model directory without its weights): Snakemake sees only the directory."""
    gaps = {}
    for r in rows:
        path = Path(r["output_file"])
        if r["status"] != MISSING and path.is_dir():
            found = _manifest_gaps(path)
            if found:
                gaps[r["output_file"]] = found
    return gaps


def snakemake_path(parts) -> str:
    """The output path a file of Snakemake's persistence directories (.snakemake/incomplete,
    .snakemake/metadata) is named after, from its path parts below that directory: the urlsafe
    base64 of the path, split into '@'-prefixed directories where longer than a file name may be.
    Not such a name: ``ValueError`` (or ``UnicodeDecodeError``)."""
    return base64.urlsafe_b64decode("".join(p.removeprefix("@") for p in parts)).decode()


def incomplete_markers(root=".snakemake/incomplete") -> list[str]:
    """The outputs Snakemake marked as begun and not finished (``snakemake_path``)."""
    root = Path(root)
    found = []
    for marker in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
        try:
            found.append(snakemake_path(marker.relative_to(root).parts))
        except (ValueError, UnicodeDecodeError):
            found.append(marker.as_posix())
    return found


def leftover_temporaries(root="results") -> list[Path]:
    """Temporaries and moved-aside copies that killed writers left under ``root`` (``atomic_path``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            if name.startswith(".") and TEMPORARY_MARK in name:
                found.append(Path(dirpath) / name)
        dirs[:] = [d for d in dirs if not (d.startswith(".") and TEMPORARY_MARK in d)]
    return sorted(found)


def _listing(paths, shown: int = SHOWN) -> str:
    paths = list(paths)
    return ", ".join(paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def rebuild_command(paths, config_args: str = "") -> str:
    """The command that remakes ``paths`` and everything made from them (their consumers are older
    than a remade file, so Snakemake reruns them too): ``--forcerun`` runs their jobs although no
    consumer asks for them. The paths go last: ``--forcerun`` takes every argument after it."""
    return f"snakemake --cores all{config_args} --forcerun " + " ".join(shlex.quote(p) for p in paths)


def refusal(rows, config_args: str = "", markers=None) -> str | None:
    """Why the run the summary describes cannot be recorded yet (one line, ending in the command
    that clears it), or None.

    ``markers``: the outputs marked incomplete (default: read .snakemake/incomplete). A marked output
    of the DAG counts as interrupted where ``--rerun-incomplete`` does redo it: it exists (maybe half
    written), or a job is planned for it anyway. A marked output that is missing with no job planned
    is simply missing (Snakemake ignores that marker, so ``--rerun-incomplete`` would not clear it):
    ``--forcerun`` rebuilds it, and its job's end clears the marker. A marked output outside the DAG
    (another config's) that exists is rerun with that config or removed; one that is gone is no reason."""
    markers = incomplete_markers() if markers is None else markers
    by_path = {r["output_file"]: r for r in rows}
    ours = [m for m in markers if m in by_path and (os.path.lexists(m) or by_path[m]["plan"] != "no update")]
    foreign = [m for m in markers if m not in by_path and os.path.lexists(m)]
    missing = missing_outputs(rows)
    if ours or missing:
        command = f"snakemake --cores all{' --rerun-incomplete' if ours else ''}{config_args}" + (
            rebuild_command(missing)[len("snakemake --cores all") :] if missing else ""
        )
        interrupted = (
            f"the last Snakemake run was interrupted: {len(ours)} output(s) begun but not finished "
            f"({_listing(ours, 3)}) are marked in .snakemake/incomplete"
        )
        absent = (
            f"{len(missing)} output(s) the workflow expects are missing ({_listing(missing)}) with no job "
            f"planned to make them ('snakemake -n' may say nothing to do: no consumer asks for them again)"
        )
        if ours and missing:
            return f"{interrupted}, and {absent}; complete the run and rebuild them: {command}"
        if ours:
            return f"{interrupted}; complete the run first: {command}"
        return f"the run is incomplete: {absent}; rebuild them and what was made from them: {command}"
    if foreign:
        return (
            f"{len(foreign)} output(s) outside this config's workflow were begun and not finished by an "
            f"interrupted run ({_listing(foreign, 3)}; marked in .snakemake/incomplete): complete them with the "
            f"config that made them (snakemake --cores all --rerun-incomplete --configfile ...), or remove "
            f"them: rm -rf {' '.join(shlex.quote(m) for m in foreign)}"
        )
    gaps = incomplete_gaps(rows)
    if gaps:
        files = [f for found in gaps.values() for f in found]
        return (
            f"the run is incomplete: {len(files)} file(s) listed in an output's SHA256SUMS are missing "
            f"({_listing(files)}); rebuild them and what was made from them: "
            f"{rebuild_command(sorted(gaps), config_args)}"
        )
    return None


def check(summary_file, config_args: str = "", results="results") -> int:
    """The script's check: print the refusal (stdout) and return 1, or note what stays unrecorded
    (stderr) and return 0."""
    rows = summary_rows(Path(summary_file).read_text())
    reason = refusal(rows, config_args)
    if reason:
        print(reason)
        return 1
    leftovers = leftover_temporaries(results)
    if leftovers:
        print(
            f"record_artifacts.sh: note: {len(leftovers)} temporary file(s) of killed writers are not recorded "
            f"(.dvcignore; the next write of the same output discards them): "
            f"{_listing(p.as_posix() for p in leftovers)}",
            file=sys.stderr,
        )
    return 0


def check_run(summary_file, config_args: str = "", results="results") -> int:
    """``check``, with a summary that cannot be read or parsed as its one line (stdout) and 1: the
    scripts show stdout as the reason they refuse."""
    try:
        return check(summary_file, config_args, results)
    except (OSError, ValueError) as e:
        print(f"cannot check the run: {e}")
        return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unisparse.records", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="exit 1 with one line if the run in the summary cannot be recorded yet")
    c.add_argument("--summary", required=True, help="a file holding the output of 'snakemake --summary'")
    c.add_argument("--config-args", default="", help="the run's config arguments as typed, e.g. ' --configfile X'")
    c.add_argument("--results", default="results", help="where temporaries of killed writers are looked for")
    args = parser.parse_args(argv)
    return check_run(args.summary, args.config_args, args.results)


if __name__ == "__main__":
    sys.exit(main())
