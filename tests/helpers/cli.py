"""The CLI run in-process, as the tests of its verbs call it."""

import logging

from unisparse.cli import main


def cli(*argv) -> None:
    """``unisparse --no-progress ARGV`` in this process; a refusal propagates as SystemExit."""
    try:
        main(["--no-progress", *map(str, argv)])
    finally:  # the CLI's log handler writes to the caller's captured stderr: drop it with the test
        logging.getLogger().handlers.clear()


def run_cli(*argv):
    """Run the CLI in-process; its exit status."""
    try:
        cli(*argv)
        return 0
    except SystemExit as e:
        return e.code


def refused(capsys, *argv, naming):
    """The verb exits 2 with one line that names the problem (no traceback)."""
    code = run_cli(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    last = err[-1]
    assert "Traceback" not in "\n".join(err) and naming in last, err
    return last
