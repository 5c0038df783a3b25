"""Code identity for reruns (unisparse.codemap.code_identity, rules/common.smk ``code``): a job's code
input is the digest of the code its verb runs for the configured family and benchmarks, of its meaning.

Pinned here: an edit that leaves the code's meaning unchanged (comments, docstrings, formatting,
sorted imports) changes no digest; a real change to the Qwen-Image family's modules or to the MME or
GenEval benchmarks' code changes no digest of the default (MoT, shapes benchmarks) and does change
the digests of a configuration that uses them; a real change to prune/width.py changes the width
verb's digest only; every family and benchmark module is attributed to its name. Unit level on
copies of the package (fast); the ``slow`` test asks ``snakemake -n`` on a copy of the workflow.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.workflow import BIN, REPO, copy_workflow, planned_jobs, snakemake, stand_in_cli
from unisparse import codemap
from unisparse.codemap import Package, write_code_identity

SRC = REPO / "src" / "unisparse"
DEFAULT = ("mot", ("shapes_geneval", "shapesqa"))
QWEN = ("qwen_image", ("geneval", "mme"))


def rule_verbs() -> list[str]:
    """The verbs the rules take a code input of (``code=code("verb")``)."""
    verbs = set()
    for path in (REPO / "rules").glob("*.smk"):
        verbs |= set(re.findall(r'code=code\("([\w-]+)"\)', path.read_text()))
    return sorted(verbs)


VERBS = rule_verbs()
#: the verbs of the default study (the other family's import is no job of it)
DEFAULT_VERBS = [v for v in VERBS if v != "import-qwen-image"]


def copy_package(tmp_path: Path) -> Path:
    """A copy of the package (its directory keeps the name ``unisparse``: module names depend on it)."""
    dst = tmp_path / "src" / "unisparse"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def digests(package_dir: Path, config=DEFAULT, verbs=None) -> dict[str, str]:
    """verb -> digest, from a fresh parse of ``package_dir`` (config: (family, benchmarks) or None;
    the default's verbs for the default)."""
    return digests_of(Package(package_dir), config, verbs)


def digests_of(pkg: Package, config=DEFAULT, verbs=None) -> dict[str, str]:
    configured = None if config is None else pkg.configured(*config)
    verbs = verbs or (DEFAULT_VERBS if config == DEFAULT else VERBS)
    return {verb: pkg.identity(verb, configured).digest for verb in verbs}


def modules(package_dir: Path, pattern: str = "**/*.py") -> list[Path]:
    return sorted(p for p in package_dir.glob(pattern) if "__pycache__" not in p.parts)


def edit_docstrings(text: str) -> str:
    """Every docstring (module, class, function) gets words appended."""
    tree = ast.parse(text)
    spots = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                spots.append((value.end_lineno, value.end_col_offset))
    lines = text.splitlines(keepends=True)
    for line, col in sorted(spots, reverse=True):
        s = lines[line - 1]
        quote = 3 if s[:col].endswith(('"""', "'''")) else 1
        lines[line - 1] = s[: col - quote] + " (edited, without new meaning)" + s[col - quote :]
    return "".join(lines)


def touch_bodies(text: str, only=None) -> str:
    """A statement (``_unused = 0``) at the start of every function body (of the ``only`` names):
    a real change to each function."""
    tree = ast.parse(text)
    spots = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (only is None or node.name in only):
            body = node.body
            docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            first = body[1] if docstring and len(body) > 1 else body[0]
            if first.lineno > node.lineno:
                spots.append((first.lineno, first.col_offset))
    lines = text.splitlines(keepends=True)
    for line, col in sorted(set(spots), reverse=True):
        lines.insert(line - 1, " " * col + "_unused = 0\n")
    return "".join(lines)


def owner_files(package_dir: Path, name: str) -> list[Path]:
    """The modules named after a registered name (``qwen_image*.py``, ``mme*.py``) anywhere in the package."""
    return [p for p in modules(package_dir) if p.stem.startswith(name)]


# --- meaning, not text


def test_comments_docstrings_and_formatting_change_no_digest(tmp_path):
    """A comment line at the top and bottom of every module, every docstring reworded, every argparse
    help text changed, and (where ruff is installed) the tree reformatted with imports sorted and
    unused ones dropped: no verb's digest moves, for the default, Qwen-Image and every-name configs."""
    pkg = copy_package(tmp_path)
    parsed = Package(pkg)
    before = {config: digests_of(parsed, config) for config in (DEFAULT, QWEN, None)}
    for path in modules(pkg):
        text = edit_docstrings(path.read_text())
        text = re.sub(r'help="([^"]*)"', r'help="\1 (reworded)"', text)
        path.write_text("# a comment moving every line\n" + text + "\n# a comment at the end\n")
    ruff = BIN / "ruff"
    if ruff.exists():
        subprocess.run([str(ruff), "format", "-q", "--isolated", "--line-length", "80", str(pkg)], check=True)
        subprocess.run([str(ruff), "check", "-q", "--isolated", "--select", "I,F401", "--fix", str(pkg)], check=False)
    parsed = Package(pkg)
    for config, expected in before.items():
        assert digests_of(parsed, config) == expected, config


def test_a_real_change_changes_the_digest_of_the_verbs_that_run_it(tmp_path):
    """prune/width.py's functions: the width verb only, not training, calibration, depth or the MoE;
    another verb's command in cli.py: that verb only; the MME defaults, which the default's metrics
    record (evaluation settings): every verb that evaluates."""
    pkg = copy_package(tmp_path)
    base = digests(pkg)
    width = pkg / "prune" / "width.py"
    original = width.read_text()
    width.write_text(touch_bodies(original))
    changed = {v for v, d in digests(pkg).items() if d != base[v]}
    assert changed == {"prune-width"}
    width.write_text(original)
    assert digests(pkg) == base

    cli = pkg / "cli.py"
    original = cli.read_text()
    cli.write_text(touch_bodies(original, only={"cmd_calibrate"}))
    assert {v for v, d in digests(pkg).items() if d != base[v]} == {"calibrate"}
    cli.write_text(original)

    mme = pkg / "evaluate" / "mme.py"
    text = mme.read_text()
    assert re.search(r"^MME_DEFAULTS = dict\(", text, re.M), "the MME defaults moved: update this test"
    mme.write_text(re.sub(r'(?m)^(MME_DEFAULTS = dict\(\n(?:.*\n)*?\s*mme_split=)"test"', r'\1"val"', text, count=1))
    assert mme.read_text() != text
    changed = {v for v, d in digests(pkg).items() if d != base[v]}
    assert {"evaluate", "prune-width", "prune-depth", "partition", "tune-moe"} <= changed
    assert not changed & {"train-tiny", "aggregate", "import-bagel"}


# --- families and benchmarks


def test_family_and_benchmark_code_is_none_of_the_defaults(tmp_path):
    """A real change to every function of the Qwen-Image family's modules (families/qwen_image.py,
    models/qwen_image*.py, whatever they are split into), of evaluate/mme.py and of
    evaluate/geneval.py changes no digest of the default; each changes the Qwen-Image config's."""
    pkg = copy_package(tmp_path)
    parsed = Package(pkg)
    default, qwen = digests_of(parsed, DEFAULT), digests_of(parsed, QWEN, ["evaluate"])
    groups = {
        "qwen_image": owner_files(pkg, "qwen_image"),
        "mme": [pkg / "evaluate" / "mme.py"],
        "geneval": [pkg / "evaluate" / "geneval.py"],
    }
    assert len(groups["qwen_image"]) >= 2, groups
    for name, paths in groups.items():
        originals = {p: p.read_text() for p in paths}
        for p, text in originals.items():
            p.write_text(touch_bodies(text))
        parsed = Package(pkg)
        assert digests_of(parsed, DEFAULT) == default, f"a change to {name}'s code changed the default's"
        assert digests_of(parsed, QWEN, ["evaluate"]) != qwen, f"{name}'s code is not the Qwen-Image config's"
        for p, text in originals.items():
            p.write_text(text)


def test_every_family_and_benchmark_module_is_attributed():
    """Each family and each non-default benchmark is found where it is selected (a registry entry, a
    branch on its name); each module named after one belongs to it (only it reaches the module);
    under the default no function or class of another family's or benchmark's modules counts."""
    pkg = Package(SRC)
    from unisparse.choices import BENCHMARKS, FAMILIES

    defaults = {names[0] for names in BENCHMARKS.values()}
    names = set(FAMILIES) | {n for ns in BENCHMARKS.values() for n in ns}
    assert pkg.family_names == set(FAMILIES) and pkg.benchmark_names | set(FAMILIES) == names
    for name in sorted(names - defaults):
        assert pkg.entry_modules(name), f"{name}: no code selected for it (registry entry or branch on its name)"
    assert f"unisparse.families.{'qwen_image'}" in pkg.entry_modules("qwen_image")
    for name in sorted(names - defaults - {DEFAULT[0]}):
        owned = pkg.owned_modules(name)
        for path in owner_files(SRC, name):
            module = "unisparse." + ".".join(path.relative_to(SRC).with_suffix("").parts)
            assert module in owned, (
                f"{path.relative_to(REPO)} is reached without {name!r} being configured "
                f"(e.g. {' -> '.join(pkg.path('unisparse.cli', module) or [])}): its edits "
                "would rerun other configurations' jobs"
            )
    configured = pkg.configured(*DEFAULT)
    foreign = set().union(*(pkg.owned_modules(n) for n in names - configured))
    for verb in DEFAULT_VERBS:
        for module, labels in pkg.identity(verb, configured).parts:
            if module in foreign:
                code = {n.name for n in pkg.trees[module].body if isinstance(n, codemap._DEFS)}
                assert not code & set(labels), (verb, module, sorted(code & set(labels)))


def test_a_new_module_of_a_family_is_attributed_without_being_named(tmp_path):
    """A module the Qwen-Image family adds (imported from families/qwen_image.py) is Qwen-Image's:
    its edits change no digest of the default. Imported by the core instead, it is not, and the
    attribution test above would name it."""
    pkg = copy_package(tmp_path)
    (pkg / "models" / "qwen_image_extra.py").write_text('"""New."""\n\n\ndef helper():\n    return 1\n')
    family = pkg / "families" / "qwen_image.py"
    family.write_text(family.read_text() + "\nfrom ..models.qwen_image_extra import helper  # noqa: E402\n")
    assert "unisparse.models.qwen_image_extra" in Package(pkg).owned_modules("qwen_image")
    default = digests(pkg)
    (pkg / "models" / "qwen_image_extra.py").write_text('"""New."""\n\n\ndef helper():\n    return 2\n')
    assert digests(pkg) == default
    runner = pkg / "evaluate" / "runner.py"
    runner.write_text(runner.read_text() + "\nfrom ..models.qwen_image_extra import helper  # noqa: E402\n")
    assert "unisparse.models.qwen_image_extra" not in Package(pkg).owned_modules("qwen_image")


# --- the slicing rules, on a made-up package


def test_what_counts_on_a_made_up_package(tmp_path):
    """Definitions count by use; effects whenever their module loads; a branch on an unconfigured name
    and a registry entry of one do not count; the other verbs' commands do not; a module used as an
    object counts whole."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "choices.py": 'FAMILIES = ("a", "b")\nBENCHMARKS = {"t": ("x", "y")}\n',
        "cli.py": (
            "import argparse\n\n"
            "def cmd_one(args):\n    from .lib import used\n    used()\n\n"
            "def cmd_two(args):\n    from .other import thing\n\n"
            "def build(sub):\n    s = sub.add_parser('one')\n    s.set_defaults(func=cmd_one)\n"
            "    s = sub.add_parser('two')\n    s.set_defaults(func=cmd_two)\n\n"
            "def main():\n    build(argparse.ArgumentParser().add_subparsers())\n"
        ),
        "lib.py": (
            "from .reg import REGISTRY, register\n\n"
            "def used(bench='x'):\n    if bench == 'y':\n        from .ybench import run\n        return run()\n"
            "    return helper() + REGISTRY['k']\n\n"
            "def helper():\n    return 1\n\n"
            "def unused():\n    return 2\n\n"
            "@register\ndef registered():\n    return 3\n"
        ),
        "reg.py": (
            "REGISTRY = {}\n\ndef register(f):\n    REGISTRY[f.__name__] = f\n    return f\n\n"
            "FAMILIES = {'a': 'pkg.fam_a:A', 'b': 'pkg.fam_b:B'}\n"
        ),
        "ybench.py": "def run():\n    return 0\n",
        "fam_a.py": "class A: pass\n",
        "fam_b.py": "class B: pass\n",
        "other.py": "thing = 1\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    pkg = Package(root)
    parts = dict(pkg.identity("one", pkg.configured("a", ["x"])).parts)
    assert parts["pkg.lib"] == ("import:REGISTRY,register", "used", "helper", "registered")  # not `unused`
    assert "pkg.other" not in parts and "cmd_two" not in parts["pkg.cli"]  # the other verb's command
    assert "pkg.ybench" not in parts  # the branch on benchmark y
    assert pkg.entry_modules("y") == {"pkg.ybench"} and pkg.entry_modules("b") == {"pkg.fam_b"}
    assert dict(pkg.identity("one", pkg.configured("a", ["x", "y"])).parts)["pkg.ybench"] == ("run",)
    only_x, with_y = (pkg.identity("one", pkg.configured("a", names)).digest for names in (["x"], ["x", "y"]))
    assert only_x != with_y


# --- the digest file


def test_the_digest_file_changes_only_with_the_digest(tmp_path):
    """Rewritten (a new modification time) only when the digest changes; its content depends on the
    meaning only (no line numbers), so reverting an edit restores it byte for byte."""
    pkg = copy_package(tmp_path)
    out = tmp_path / "results" / ".code"

    def write():
        codemap.package.cache_clear()
        codemap._identity.cache_clear()
        return Path(write_code_identity("prune-width", out, pkg, *DEFAULT))

    path = write()
    assert path.name == "prune-width-mot-shapes_geneval+shapesqa.sha256"
    content, stamp = path.read_bytes(), path.stat().st_mtime_ns
    width = pkg / "prune" / "width.py"
    original = width.read_text()
    width.write_text("# comment\n" + original)
    assert write() == path and path.stat().st_mtime_ns == stamp
    width.write_text(touch_bodies(original))
    write()
    assert path.read_bytes() != content
    width.write_text("\n\n" + original)
    write()
    assert path.read_bytes() == content
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary left behind"


# --- with Snakemake

TARGETS = ["results/tables/probes.csv", "results/tables/moe.csv"]  # all but the figures (papermill)


def micro_snakemake(workdir: Path, *args: str, stand_in: Path | None = None) -> subprocess.CompletedProcess:
    """Snakemake on micro.yaml up to the tables, on one core; a failure fails the test."""
    return snakemake(workdir, "--cores", "1", *args, targets=TARGETS, path_first=stand_in)


@pytest.mark.slow
def test_snakemake_reruns_only_what_a_change_touches(tmp_path):
    """On a finished micro run (a stand-in CLI makes the outputs, so Snakemake records every job):
    a comment in families/qwen_image.py, a real change to it, to evaluate/mme.py or to
    evaluate/geneval.py plan nothing; a real change to prune/width.py plans the width jobs and what
    is made from them, not training, calibration, depth or the MoE partitions; undone, nothing."""
    work = copy_workflow(tmp_path / "wf")
    micro_snakemake(work, stand_in=stand_in_cli(tmp_path / "bin"))
    assert planned_jobs(micro_snakemake(work, "-n")) == {}
    pkg = work / "src" / "unisparse"
    family = pkg / "families" / "qwen_image.py"
    edits = [
        (family, lambda t: t + "# a comment\n"),
        (family, touch_bodies),
        (pkg / "evaluate" / "mme.py", touch_bodies),
        (pkg / "evaluate" / "geneval.py", touch_bodies),
    ]
    for path, edit in edits:
        original = path.read_text()
        path.write_text(edit(original))
        assert planned_jobs(micro_snakemake(work, "-n")) == {}, path.relative_to(work)
        path.write_text(original)
    width = pkg / "prune" / "width.py"
    original = width.read_text()
    width.write_text(touch_bodies(original))
    jobs = planned_jobs(micro_snakemake(work, "-n"))
    assert jobs.pop("prune_width") >= 1
    assert set(jobs) <= {"tune_control", "probes_table", "moe_table"}, jobs
    assert not {"train_tiny", "calibrate", "prune_depth", "partition", "tune_moe", "evaluate"} & set(jobs)
    # undone: the digest file is rewritten (newer) with the content Snakemake recorded for the jobs
    width.write_text(original)
    assert planned_jobs(micro_snakemake(work, "-n")) == {}
