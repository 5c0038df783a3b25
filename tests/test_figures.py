"""The figure stage end to end: papermill notebooks run by Snakemake rules on a micro run.

`micro_run` (tests/conftest.py, session-scoped) copies the workflow into a temporary directory and
runs the whole micro pipeline there once (about 1.5 minutes on two cores); every test that needs
pipeline outputs reuses it. Set UNISPARSE_MICRO_RUN=<dir of a finished micro run> to start from a copy
of that run instead: Snakemake then reruns only what is out of date.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.workflow import MICRO, REPO, copy_workflow, snakemake

pytestmark = pytest.mark.slow  # drives Snakemake (or DVC) in subprocesses: outside the fast inner loop

FAMILIES = ["depth_curves", "width_curves", "moe_recovery", "expert_load", "quality_speed"]
FIGURE_RULES = {
    "depth_figure": "depth_curves",
    "width_figure": "width_curves",
    "moe_recovery_figure": "moe_recovery",
    "expert_load_figure": "expert_load",
    "quality_speed_figure": "quality_speed",
}
CAPTIONS = {  # the first words of each figure's caption in workflow/report/
    "depth_curves": "Depth pruning.",
    "width_curves": "Width reduction.",
    "moe_recovery": "MoE recovery.",
    "expert_load": "Expert load per layer.",
    "quality_speed": "Quality vs measured speed.",
}


def read_notebook(path: Path) -> dict:
    return json.loads(path.read_text())


def error_outputs(notebook: dict) -> list:
    return [
        o
        for c in notebook["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if o["output_type"] == "error"
    ]


# --- the notebooks as committed -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_notebook_has_parameters_cell_title_and_no_outputs(family):
    nb = read_notebook(REPO / "notebooks" / f"{family}.ipynb")
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and tagged[0]["cell_type"] == "code"
    assert nb["cells"][0]["cell_type"] == "markdown" and "".join(nb["cells"][0]["source"]).startswith("# ")
    # committed clean: results belong in logs/figures/, not in git
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code"
    )


# --- the figure rules on a micro run --------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_figure_rule_writes_png_pdf_and_executed_notebook(micro_run, family):
    png, pdf = (micro_run / f"results/figures/{family}.{ext}" for ext in ("png", "pdf"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5000

    executed = read_notebook(micro_run / f"logs/figures/{family}.ipynb")
    assert not executed["metadata"]["papermill"]["exception"]
    assert not error_outputs(executed)
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code), "every cell ran"
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and f"results/figures/{family}.png" in "".join(injected[0]["source"])
    # papermill only warns about a parameter that the notebook does not declare: a misspelled
    # parameter would silently leave the notebook on its default input
    assert "Passed unknown parameter" not in (micro_run / f"logs/figures/{family}.log").read_text()


def test_figures_are_up_to_date_after_the_run(micro_run):
    proc = snakemake(micro_run, "--dry-run", "--quiet", "rules", targets=["figures"])
    assert not any(rule in proc.stdout for rule in FIGURE_RULES), proc.stdout


def test_notebook_error_fails_rule_and_keeps_executed_notebook(micro_run, tmp_path):
    workdir = tmp_path / "broken"
    shutil.copytree(micro_run, workdir, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    (workdir / "results/tables/probes.csv").write_text("stage,variant_id\nnot,a table\n")
    figure = workdir / "results/figures/depth_curves.png"

    proc = snakemake(
        workdir,
        "--cores",
        "1",
        "--allowed-rules",
        "depth_figure",
        targets=[str(figure.relative_to(workdir))],
        check=False,
    )

    assert proc.returncode != 0
    assert "depth_figure" in proc.stderr
    assert not figure.exists() and not figure.with_suffix(".pdf").exists()
    executed = read_notebook(workdir / "logs/figures/depth_curves.ipynb")
    assert executed["metadata"]["papermill"]["exception"] is True
    errors = error_outputs(executed)
    assert errors and errors[0]["ename"] in ("KeyError", "AttributeError", "ValueError")
    assert "PapermillExecutionError" in (workdir / "logs/figures/depth_curves.log").read_text()


def test_report_contains_every_figure(micro_run):
    snakemake(micro_run, "--report", "report.html")
    html = (micro_run / "report.html").read_text()
    for family in FAMILIES:
        assert f"{family}.png" in html and f"{family}.pdf" in html
        assert CAPTIONS[family] in html
    assert "arXiv 2512.02351" in html  # the workflow description


# --- which figures the config asks for ------------------------------------------------------------


def _config_without(stages, workdir: Path) -> str:
    """micro.yaml with some stages switched off: depth and width by leaving their section out, MoE by
    an empty partition list (rules/moe.smk reads its section at parse time)."""
    config = yaml.safe_load((REPO / MICRO).read_text())
    for stage in stages:
        if stage == "moe":
            config["moe"]["partitions"] = []
        else:
            config.pop(stage)
    path = workdir / f"without-{'-'.join(stages) or 'nothing'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path.name


@pytest.mark.parametrize(
    "stages_off, expected",
    [
        ((), set(FIGURE_RULES)),
        (("moe",), {"depth_figure", "width_figure", "quality_speed_figure"}),
        (("depth", "width"), {"moe_recovery_figure", "expert_load_figure", "quality_speed_figure"}),
        (("depth",), set(FIGURE_RULES) - {"depth_figure"}),
        (("depth", "width", "moe"), set()),
    ],
)
def test_figures_follow_the_stages_in_the_config(tmp_path, stages_off, expected):
    workdir = copy_workflow(tmp_path / "wf")
    proc = snakemake(workdir, "--dry-run", "--quiet", "rules", config=_config_without(stages_off, workdir))
    planned = {rule for rule in FIGURE_RULES if f"\n{rule} " in proc.stdout}
    assert planned == expected, proc.stdout


def test_figures_name_the_benchmarks_the_tables_hold(micro_run, tmp_path):
    """The paper's tables hold GenEval and MME rows instead of the shapes benchmarks: every figure
    notebook plots whichever benchmark each task has, labelled by its name."""
    import pandas as pd

    renamed = {"ShapesQA": "MME", "ShapesGenEval": "GenEval"}
    tables = {}
    for name in ("probes", "moe"):
        df = pd.read_csv(micro_run / "results" / "tables" / f"{name}.csv")
        df["benchmark"] = df.benchmark.map(renamed)
        tables[name] = tmp_path / f"{name}.csv"
        df.to_csv(tables[name], index=False)
    inputs = {
        "depth_curves": ["-p", "probes", tables["probes"]],
        "width_curves": ["-p", "probes", tables["probes"]],
        "moe_recovery": ["-p", "moe", tables["moe"]],
        "quality_speed": ["-y", f"tables: [{tables['probes']}, {tables['moe']}]"],
    }
    for family, params in inputs.items():
        executed = tmp_path / f"{family}.ipynb"
        cmd = [
            str(Path(sys.executable).parent / "papermill"),
            "--no-progress-bar",
            "-k",
            "python3",
            str(REPO / "notebooks" / f"{family}.ipynb"),
            str(executed),
            *map(str, params),
            "-p",
            "out_png",
            str(tmp_path / f"{family}.png"),
            "-p",
            "out_pdf",
            str(tmp_path / f"{family}.pdf"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / f"{family}.png").stat().st_size > 0
        assert not error_outputs(read_notebook(executed))
