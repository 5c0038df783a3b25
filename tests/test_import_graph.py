"""The library's import graph, read with ast (unisparse.codemap, nothing imported): no cycles between
modules, algorithms that see models only through families/, and the rule-to-code map derived from it.

What counts as a cycle (``dependency_graph``):
* an edge A -> B when A imports B anywhere: at module level or inside a function (deferring an import
  to a function hides a cycle from the interpreter, not from the design), or names B in a string
  (a registry entry imported with importlib);
* ``from P import name`` is an edge to the module that *defines* ``name``, following re-exports
  (``codemap.Package.origin``): using a name through a package's ``__init__`` or the
  ``worlds.shapes`` facade depends on its defining module, not on everything the package lists;
* a package's ``__init__`` importing its own submodules is no edge: listing its contents is what a
  package does (so ``models/__init__`` re-exporting ``modeling_mot`` while ``modeling_mot`` imports
  ``models.blocks`` is fine), and running parent ``__init__`` files on import is not a dependency;
* a cycle is a set of at least two modules that reach each other; the test names one shortest cycle
  per set, with the line of each import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from unisparse.codemap import Package, verb_sources

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "unisparse"

#: algorithm modules: they see a model only through families/ (docs/models.md, "Model families")
ALGORITHMS = (
    "unisparse.calibrate",
    "unisparse.importance",
    "unisparse.prune",
    "unisparse.moe",
    "unisparse.tunedata",
    "unisparse.evaluate",
)
#: the MoT's modelling files, which algorithms must not import
MOT_MODULES = ("unisparse.models.modeling_mot", "unisparse.models.configuration_mot")
#: fragments of the MoT's weight names: an algorithm naming one is tied to that checkpoint layout
MOT_WEIGHT_KEYS = ("language_model.model.layers", "_moe_gen", "mlp_moe_gen")


@pytest.fixture(scope="module")
def pkg() -> Package:
    return Package(SRC)


def targets(pkg: Package, imp) -> set[str]:
    """The modules an import depends on: the defining module of every name it takes."""
    if not imp.names:
        return {imp.target}
    return {pkg.origin(imp.target, name) for name in imp.names if name != "*"} | (
        {imp.target} if "*" in imp.names else set()
    )


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def dependency_graph(pkg: Package) -> dict[str, dict[str, object]]:
    """module -> {module it depends on: the first import that makes it so} (see the module docstring)."""
    graph = {m: {} for m in pkg.files}
    for module, imports in pkg.imports.items():
        for imp in imports:
            for target in targets(pkg, imp):
                if target == module or (pkg.is_package(module) and inside(target, module)):
                    continue
                graph[module].setdefault(target, imp)
    return graph


def strongly_connected(graph) -> list[set[str]]:
    """Tarjan's components of the graph, those of two or more modules."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(graph, comp: set[str]) -> list[str]:
    """A shortest cycle inside one component, as [a, b, ..., a]."""
    best = None
    for start in sorted(comp):
        previous, todo = {start: None}, [start]
        while todo:
            v = todo.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    chain = [v]
                    while previous[chain[-1]] is not None:
                        chain.append(previous[chain[-1]])
                    cycle = chain[::-1] + [start]
                    if best is None or len(cycle) < len(best):
                        best = cycle
                    todo = []
                    break
                if w in comp and w not in previous:
                    previous[w] = v
                    todo.append(w)
    return best


def describe(pkg: Package, graph, cycle: list[str]) -> str:
    steps = [cycle[0]]
    for a, b in zip(cycle, cycle[1:]):
        imp = graph[a][b]
        where = "module level" if not imp.function_level else f"in {imp.scope}"
        how = "names it in a string" if imp.kind == "string" else "imports"
        steps.append(f"  {how} {b}  ({pkg.files[a].relative_to(pkg.dir.parent)}:{imp.line}, {where})")
    return "\n".join(steps)


def cycles(pkg: Package) -> list[str]:
    graph = dependency_graph(pkg)
    return [describe(pkg, graph, shortest_cycle(graph, comp)) for comp in strongly_connected(graph)]


def test_no_import_cycles(pkg):
    found = cycles(pkg)
    assert not found, f"{len(found)} import cycle(s) between modules:\n" + "\n\n".join(found)


def mot_ties(pkg: Package, algorithms=ALGORITHMS) -> list[str]:
    """Imports of the MoT's modelling files (directly, or a name they define through a re-export) and
    MoT weight keys in strings (docstrings aside) in the ``algorithms`` modules."""
    found = []
    for module in sorted(pkg.files):
        if not any(inside(module, a) for a in algorithms):
            continue
        path = pkg.files[module].relative_to(pkg.dir.parent)
        for imp in pkg.imports[module]:
            bad = sorted(t for t in targets(pkg, imp) | {imp.target} if t in MOT_MODULES)
            if bad:
                names = [n for n in imp.names if pkg.origin(imp.target, n) in MOT_MODULES]
                via = f" (via {imp.target}: {', '.join(names)})" if imp.target not in MOT_MODULES else ""
                found.append(f"{path}:{imp.line}: imports {', '.join(bad)}{via}")
        tree = pkg.trees[module]
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                keys = [k for k in MOT_WEIGHT_KEYS if k in node.value]
                if keys:
                    found.append(f"{path}:{node.lineno}: names MoT weight key {node.value!r}")
    return found


def test_algorithms_see_models_only_through_families(pkg):
    """calibrate, importance, prune/, moe/ and evaluate/ import no MoT modelling file (also not through the
    models package's re-exports) and name no MoT weight key: the family adapter does that."""
    found = mot_ties(pkg)
    assert not found, "algorithms tied to the MoT's modelling files:\n" + "\n".join(found)


def test_the_checks_find_what_they_look_for(tmp_path):
    """Both checks above on a made-up package holding one cycle and each kind of MoT tie."""
    root = tmp_path / "unisparse"
    files = {
        "__init__.py": "",
        "models/__init__.py": "from .configuration_mot import MoTConfig\nfrom .modeling_mot import Model\n",
        "models/configuration_mot.py": "class MoTConfig: pass\n",
        "models/modeling_mot.py": "from .configuration_mot import MoTConfig\nclass Model: pass\n",
        "prune/__init__.py": "from .depth import drop\n",  # an __init__ listing its modules: no cycle
        "prune/depth.py": (
            '"""Drops layers such as mlp_moe_gen (a docstring: fine)."""\n'
            "from . import common\n\ndef drop():\n    from ..models import MoTConfig\n"
            "    return 'language_model.model.layers.0'\n"
        ),
        "prune/common.py": "def helper():\n    from .depth import drop\n",
        "moe/__init__.py": "",
        "moe/tune.py": "import unisparse.models.modeling_mot\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    pkg = Package(root)
    (cycle,) = cycles(pkg)
    assert cycle.startswith("unisparse.prune.common\n") or cycle.startswith("unisparse.prune.depth\n"), cycle
    assert "in helper" in cycle and "unisparse/prune/depth.py:2, module level" in cycle
    ties = mot_ties(pkg)
    assert len(ties) == 3, ties
    assert any(
        "depth.py:5: imports unisparse.models.configuration_mot (via unisparse.models: MoTConfig)" in t for t in ties
    )
    assert any("depth.py:6: names MoT weight key" in t for t in ties)
    assert any("tune.py:1: imports unisparse.models.modeling_mot" in t for t in ties)


# --- the rule-to-code map


def rule_verbs() -> dict[str, tuple[str, str]]:
    """rule name -> (the verb its `code(...)` input names, its shell command)."""
    out = {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=\s*rule \w+:)", path.read_text()):
            name = re.match(r"\s*rule (\w+):", block)
            code = re.search(r'code=code\("([\w-]+)"\)', block)
            if name and code:
                shell = block.split("shell:", 1)[1]
                key = name.group(1) if name.group(1) not in out else f"{name.group(1)}[{code.group(1)}]"  # per family
                out[key] = (code.group(1), " ".join(re.findall(r'"([^"]*)"', shell)))
    return out


def test_every_rule_maps_the_verb_it_runs():
    rules = rule_verbs()
    assert {
        "train_tiny",
        "calibrate",
        "prune_depth",
        "prune_width",
        "partition",
        "tune_moe",
        "tune_control",
        "evaluate",
        "probes_table",
        "moe_table",
        "import_checkpoint",
        "import_checkpoint[import-qwen-image]",
    } <= set(rules)
    for rule, (verb, shell) in rules.items():
        assert re.search(rf"--no-progress {re.escape(verb)} ", shell), (rule, verb, shell)
        files = verb_sources(verb, SRC)
        assert str(SRC / "cli.py") in files, rule
        assert all(Path(f).is_file() for f in files), rule


def test_tuning_runs_the_training_loop():
    for verb in ("tune-moe", "tune"):
        names = {Path(f).relative_to(SRC).as_posix() for f in verb_sources(verb, SRC)}
        assert names & {"train.py", "trainloop.py"}, sorted(names)
        assert "moe/tune.py" in names


def test_code_map_follows_what_a_verb_imports():
    names = lambda verb: {Path(f).relative_to(SRC).as_posix() for f in verb_sources(verb, SRC)}  # noqa: E731
    tables = names("aggregate")
    assert "tables.py" in tables and not any(n.startswith(("models/", "prune/", "moe/")) for n in tables)
    depth = names("prune-depth")
    assert {"prune/depth.py", "prune/__init__.py", "__init__.py", "worlds/scenes.py", "calibrate.py"} <= depth


def test_codemap_resolves_imports(tmp_path):
    """Relative and absolute, module- and function-level imports, submodules named in `from . import`,
    registry strings, parent packages and re-exports, on a package made up for the test."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "cli.py": (
            "import argparse\nfrom . import base\n\n"
            "def cmd_a(args):\n    from .sub import a\n    helper()\n\n"
            "def helper():\n    import pkg.c\n\n"
            "def cmd_b(args):\n    from .sub.b import thing\n\n"
            "def build(sub):\n    s = sub.add_parser('a', aliases=['aa'])\n    s.set_defaults(func=cmd_a)\n"
            "    s = sub.add_parser('b')\n    s.set_defaults(func=cmd_b)\n"
        ),
        "base.py": "X = 1\n",
        "c.py": "REGISTRY = {'d': 'pkg.d:D'}\n",
        "d.py": "class D: pass\n",
        "sub/__init__.py": "from .a import A\n",
        "sub/a.py": "from ..base import X\nA = X\n",
        "sub/b.py": "from . import A\nthing = A\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    pkg = Package(root)
    assert pkg.verbs() == {"a": "cmd_a", "aa": "cmd_a", "b": "cmd_b"}
    assert pkg.verb_modules("a") == {"pkg", "pkg.cli", "pkg.base", "pkg.sub", "pkg.sub.a", "pkg.c", "pkg.d"}
    assert pkg.verb_modules("b") == {"pkg", "pkg.cli", "pkg.base", "pkg.sub", "pkg.sub.a", "pkg.sub.b"}
    assert pkg.origin("pkg.sub", "A") == "pkg.sub.a"
    (imp,) = pkg.imports["pkg.sub.b"]
    assert (imp.target, imp.names, imp.function_level) == ("pkg.sub", ("A",), False)
    assert [i.kind for i in pkg.imports["pkg.c"]] == ["string"]
