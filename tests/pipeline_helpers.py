"""Helpers shared by the end-to-end pipeline tests."""
import re
from pathlib import Path


def failed_job_logs(cwd, output):
    """The logs of the jobs Snakemake reports as failed (the rules' own stderr), for the message."""
    names = []
    for block in re.findall(r"^Error in rule \w+:\n(.*?)(?=^\S|\Z)", output, re.M | re.S):
        names += re.findall(r"^\s+log: (\S+)", block, re.M)
    return "".join(f"\n--- {name}:\n{Path(cwd, name).read_text(errors='replace')[-3000:]}"
                   for name in dict.fromkeys(names) if Path(cwd, name).is_file())
