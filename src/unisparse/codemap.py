"""Which library source files a ``unisparse`` verb runs, derived from the imports of the package.

The rules give every job the sources of the code its verb runs as inputs (rules/common.smk
``code``), so that editing one file reruns exactly the jobs whose verb uses it. The files are derived,
not listed by hand: the ``import`` / ``from ... import`` statements of every module, at module level
and inside functions, relative imports resolved, read with ``ast``. Nothing is imported, so Snakemake
can call this when it builds the DAG, without torch.

What counts as an import of module ``m``:

* ``import a.b.c`` and ``from a.b import c`` name the most specific module (``a.b.c`` when it is a
  module, else ``a.b``, whose ``__init__`` defines ``c``);
* importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first: a verb's sources include
  the ``__init__`` files of every package on the way (and what they import);
* a string constant that is exactly a module's name, or ``module:attribute``
  (``"unisparse.families.mot:MoTFamily"``: a registry entry imported with importlib), counts as an import;
* inside a module, every import counts, wherever it is: which functions of an imported module run is not
  known statically, so the map errs on the side of a rerun.

The verb itself: cli.py maps a verb to a function (``s = sub.add_parser("verb", aliases=[...])`` then
``s.set_defaults(func=cmd_x)``). Its sources are cli.py (and ``__main__.py``, which torchrun runs),
cli.py's module-level imports, the imports ``main`` makes, and the imports of ``cmd_x`` and of every
cli.py function it calls (transitively) — not those of the other verbs' functions and argument
parsers (building the parser imports their modules for their ``choices``, which do not change what
this verb computes).
``verb_sources`` returns these modules and everything they import, transitively.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: the package's own directory, for library use (the rules pass the checkout's src/unisparse instead)
PACKAGE_DIR = Path(__file__).resolve().parent
#: the module whose ``add_parser`` / ``set_defaults(func=...)`` calls map verbs to functions
CLI = "cli"
MODULE_SCOPE = "<module>"


@dataclass(frozen=True)
class Import:
    """One import of ``source``: the module it names (``target``), the names it takes from that module
    when they are not submodules (``from target import a, b``; empty for ``import target``), where
    (``line``; ``scope``: ``<module>`` or the top-level function/class it sits in) and how (``kind``:
    ``import`` for a statement, ``string`` for a module named in a string)."""

    source: str
    target: str
    names: tuple = ()
    line: int = 0
    scope: str = MODULE_SCOPE
    kind: str = "import"

    @property
    def function_level(self) -> bool:
        return self.scope != MODULE_SCOPE


class Package:
    """The modules of one package directory and their imports (parsed once)."""

    def __init__(self, package_dir=PACKAGE_DIR):
        self.dir = Path(package_dir)
        self.name = self.dir.name
        if not (self.dir / "__init__.py").is_file():
            raise FileNotFoundError(f"{self.dir} is not a package directory (no __init__.py)")
        #: module name -> source file; a package is named by its directory (its ``__init__.py``)
        self.files: dict[str, Path] = {}
        for path in sorted(self.dir.rglob("*.py")):
            rel = path.relative_to(self.dir).with_suffix("")
            parts = [self.name, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if "__pycache__" in rel.parts or not all(p.isidentifier() for p in parts):
                continue
            self.files[".".join(parts)] = path
        self.trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in self.files.items()}
        self.imports: dict[str, list[Import]] = {name: self._imports(name) for name in self.files}

    def is_package(self, module: str) -> bool:
        return self.files[module].name == "__init__.py"

    def parents(self, module: str) -> list[str]:
        """The packages whose ``__init__`` runs before ``module``: ``a``, ``a.b`` for ``a.b.c``."""
        parts = module.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in self.files]

    # --- parsing

    def _absolute(self, module: str, level: int, name: str | None) -> str:
        if not level:
            return name or ""
        parts = module.split(".") if self.is_package(module) else module.split(".")[:-1]
        if level - 1 > len(parts):
            raise ImportError(f"{self.files[module]}: relative import beyond the top-level package")
        base = parts[: len(parts) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    def _longest_module(self, dotted: str) -> str | None:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.files:
                return ".".join(parts[:i])
        return None

    def _imports(self, module: str) -> list[Import]:
        out = []
        string_ref = re.compile(rf"({re.escape(self.name)}(?:\.\w+)*)(?::\w+)?")

        def visit(node, scope):
            for child in ast.iter_child_nodes(node):
                inner = scope
                if scope == MODULE_SCOPE and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    inner = child.name
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        target = self._longest_module(alias.name)
                        if target:
                            out.append(Import(module, target, (), child.lineno, scope))
                elif isinstance(child, ast.ImportFrom):
                    base = self._absolute(module, child.level, child.module)
                    if base != self.name and not base.startswith(self.name + "."):
                        continue
                    names = []
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        if sub in self.files:
                            out.append(Import(module, sub, (), child.lineno, scope))
                        else:
                            names.append(alias.name)
                    if base in self.files and names:  # (a package whose submodules alone are named still
                        out.append(Import(module, base, tuple(names), child.lineno, scope))  # runs: parents())
                elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                    m = string_ref.fullmatch(child.value)
                    if m and m.group(1) in self.files:
                        out.append(Import(module, m.group(1), (), child.lineno, scope, "string"))
                visit(child, inner)

        visit(self.trees[module], MODULE_SCOPE)
        return out

    # --- queries

    def closure(self, roots, opaque=()) -> set[str]:
        """``roots`` and every module they import, transitively, with the packages on the way; the
        imports of an ``opaque`` module are not followed (the caller chose which of them count)."""
        seen, todo = set(), list(roots)
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            if module not in self.files:
                raise KeyError(f"no module {module!r} in {self.dir}")
            seen.add(module)
            todo += self.parents(module)
            if module not in opaque:
                todo += [imp.target for imp in self.imports[module]]
        return seen

    def path(self, source: str, target: str) -> list[str] | None:
        """A shortest chain of imports (as ``closure`` follows them) from ``source`` to ``target``."""
        previous, todo = {source: None}, [source]
        while todo:
            module = todo.pop(0)
            if module == target:
                chain = [module]
                while previous[chain[-1]] is not None:
                    chain.append(previous[chain[-1]])
                return chain[::-1]
            for nxt in self.parents(module) + [imp.target for imp in self.imports[module]]:
                if nxt not in previous:
                    previous[nxt] = module
                    todo.append(nxt)
        return None

    def origin(self, module: str, name: str, _seen=None) -> str:
        """The module that defines ``name`` as seen from ``module``: follows module-level re-exports
        (``from .x import name`` in a package ``__init__`` or a facade) to where it comes from."""
        seen = _seen or set()
        if (module, name) in seen:
            return module
        seen.add((module, name))
        for imp in self.imports[module]:
            if not imp.function_level and imp.kind == "import" and name in imp.names:
                return self.origin(imp.target, name, seen)
        return module

    def top_level_functions(self, module: str) -> dict[str, ast.AST]:
        return {n.name: n for n in self.trees[module].body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def verbs(self) -> dict[str, str]:
        """Verb (and alias) -> the name cli.py dispatches it to (``set_defaults(func=...)``)."""
        cli = f"{self.name}.{CLI}"
        out = {}
        current: dict[str, list[str]] = {}  # parser variable -> the verbs of its latest add_parser
        for stmt in sorted((s for s in ast.walk(self.trees[cli]) if isinstance(s, (ast.Assign, ast.Expr))),
                           key=lambda s: (s.lineno, s.col_offset)):
            call = stmt.value
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
                continue
            if (call.func.attr == "add_parser" and isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name) and call.args and isinstance(call.args[0], ast.Constant)):
                verbs = [call.args[0].value]
                for kw in call.keywords:
                    if kw.arg == "aliases" and isinstance(kw.value, (ast.List, ast.Tuple)):
                        verbs += [e.value for e in kw.value.elts if isinstance(e, ast.Constant)]
                current[stmt.targets[0].id] = verbs
            elif call.func.attr == "set_defaults" and isinstance(call.func.value, ast.Name):
                for kw in call.keywords:
                    if kw.arg == "func" and isinstance(kw.value, ast.Name):
                        for verb in current.get(call.func.value.id, []):
                            out[verb] = kw.value.id
        return out

    def function_imports(self, module: str, function: str) -> set[str]:
        """What ``function`` of ``module`` imports, with the same-module functions it calls (transitively)."""
        functions = self.top_level_functions(module)
        seen, todo, targets = set(), [function], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            targets |= {imp.target for imp in self.imports[module] if imp.scope == name}
            todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions]
        return targets

    def verb_modules(self, verb: str) -> set[str]:
        """The modules ``unisparse <verb>`` runs (see the module docstring)."""
        cli = f"{self.name}.{CLI}"
        verbs = self.verbs()
        if verb not in verbs:
            raise KeyError(f"cli.py has no verb {verb!r}; verbs: {sorted(verbs)}")
        func = verbs[verb]
        roots = {cli} | {imp.target for imp in self.imports[cli] if not imp.function_level}
        roots |= {f"{self.name}.__main__"} & set(self.files)  # `python -m unisparse` (torchrun)
        functions = self.top_level_functions(cli)
        if "main" in functions:
            roots |= {imp.target for imp in self.imports[cli] if imp.scope == "main"}
        if func in functions:
            roots |= self.function_imports(cli, func)
        else:  # a function cli.py imports: the whole module that defines it
            roots |= {self.origin(imp.target, func) for imp in self.imports[cli] if func in imp.names}
        return self.closure(roots, opaque={cli})

    def source_files(self, modules) -> list[Path]:
        return sorted(self.files[m] for m in modules)


@lru_cache(maxsize=None)
def package(package_dir=PACKAGE_DIR) -> Package:
    """The parsed package at ``package_dir`` (cached per directory: one parse per DAG build)."""
    return Package(package_dir)


def verb_sources(verb: str, package_dir="src/unisparse") -> list[str]:
    """The source files ``unisparse <verb>`` runs, as paths under ``package_dir`` (sorted)."""
    pkg = package(str(package_dir))
    return [f"{Path(package_dir).as_posix()}/{path.relative_to(pkg.dir).as_posix()}"
            for path in pkg.source_files(pkg.verb_modules(verb))]


def module_sources(module: str, package_dir=PACKAGE_DIR) -> list[Path]:
    """The source files of ``module`` (e.g. ``"unisparse.worlds.shapes"``) and everything it imports."""
    pkg = package(str(package_dir))
    return pkg.source_files(pkg.closure([module]))
