"""Which library code a ``unisparse`` verb runs, derived from the package's source with ``ast``.

Nothing is imported, so Snakemake calls this when it reads the rules, without torch. Two answers:

* ``verb_sources``: the source files a verb may load (whole modules, by their imports);
* ``code_identity``: a digest of the code a verb runs for one configuration (its model family and
  benchmarks), of its meaning, not its text: positions, comments, docstrings, formatting, the order
  of import statements and argparse ``help=`` texts do not change it. Every job's code input is
  its verb's digest file (rules/common.smk ``code``; ``write_code_identity``), rewritten only when
  the digest changes, so an edit reruns exactly the jobs whose code it changes.

What counts as an import of module ``m`` (both answers):

* ``import a.b.c`` and ``from a.b import c`` name the most specific module (``a.b.c`` when it is a
  module, else ``a.b``, whose ``__init__`` defines ``c``);
* importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first (and what they import);
* a string constant that is exactly a module's name, or ``module:attribute``
  (``"unisparse.families.mot:MoTFamily"``: a registry entry imported with importlib), counts as an
  import (the package's bare name, which names loggers and programs, does not);
* inside a module, every import counts, wherever it is: which functions of an imported module run is not
  known statically, so the map errs on the side of a rerun.

The verb itself: cli.py maps a verb to a function (``s = sub.add_parser("verb", aliases=[...])`` then
``s.set_defaults(func=cmd_x)``). Its sources are cli.py (and ``__main__.py``, which torchrun runs),
cli.py's module-level imports, the imports ``main`` makes, and the imports of ``cmd_x`` and of every
cli.py function it calls (transitively) — not those of the other verbs' functions and argument
parsers (building the parser imports their modules for their ``choices``, which do not change what
this verb computes). ``verb_sources`` returns these modules and everything they import, transitively.

Families and benchmarks (the *registered names*: ``choices.FAMILIES`` and ``choices.BENCHMARKS``).
Code that runs for one family or benchmark only is found where it is selected, not listed by hand:

* a branch guarded by a comparison with a registered name (``if bench == "mme":``,
  ``if cls.name == "mot":``, ``x in ("mme", "geneval")``, ``!=`` for the ``else``) runs only for it;
* the value of a dict entry whose key is a registered name (``FAMILIES = {"qwen_image": ("...:Cls", ...)}``)
  is that name's.

Given a configuration, such code of the names not configured is dropped: the imports in it are not
followed and its statements count as ``...``. A name's *entry modules* are those imports' targets;
``owned_modules`` are the modules only they reach (e.g. a new ``models/qwen_image_pipeline.py``
imported by ``families/qwen_image.py`` is Qwen-Image's without being named anywhere).

The code identity counts definitions, not whole modules. Starting from ``main`` and the verb's
function in cli.py, it follows the names each counted statement uses: a top-level statement counts
when it defines a name that counted code uses (``from .mme import MME_DEFAULTS`` counts the statement
defining ``MME_DEFAULTS`` and what it uses, not the rest of ``evaluate/mme.py``), and a module
counts with every statement that has an effect when it is imported (a call, an assignment to an
attribute or item, a compound statement, a definition under a decorator of the package's own) once
any import loads it. A module whose names cannot be followed statically (``import *``,
``globals()``, ``vars()``, ``__import__``, a module ``__getattr__``, ``__init_subclass__``, a
metaclass), or that is used as a module object (``from . import tasks``), counts whole. The other
verbs' functions in cli.py count only where this verb's code calls them (``set_defaults(func=...)``
names them all and is not a use). The assumption (which these rules make checkable): importing a
module has no effect beyond binding its names, except by the statements that count as effects.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import socket
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: the package's own directory, for library use (the rules pass the checkout's src/unisparse instead)
PACKAGE_DIR = Path(__file__).resolve().parent
#: the module whose ``add_parser`` / ``set_defaults(func=...)`` calls map verbs to functions
CLI = "cli"
#: the module (under the package) and the names in it that register the families and benchmarks
REGISTRY = ("choices", "FAMILIES", "BENCHMARKS")
MODULE_SCOPE = "<module>"
#: what a digest file starts with; the rest of the file lists what the digest covers
IDENTITY_FORMAT = "unisparse-code-identity 1"
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
#: names whose use makes a module's bindings dynamic (then it counts whole)
_DYNAMIC_NAMES = {"globals", "vars", "__import__"}
_DYNAMIC_DEFS = {"__getattr__", "__init_subclass__"}


@dataclass(frozen=True)
class Import:
    """One import of ``source``: the module it names (``target``), the names it takes from that module
    when they are not submodules (``from target import a, b``; for a string ``"module:attr"``,
    ``attr``; empty for ``import target``), where (``line``; ``scope``: ``<module>`` or the top-level
    function/class it sits in), how (``kind``: ``import`` for a statement, ``string`` for a module named
    in a string) and under which conditions (``gates``: per enclosing branch or registry entry, the
    registered names it runs for; it runs when each gate holds a configured name)."""

    source: str
    target: str
    names: tuple = ()
    line: int = 0
    scope: str = MODULE_SCOPE
    kind: str = "import"
    gates: tuple = ()

    @property
    def function_level(self) -> bool:
        return self.scope != MODULE_SCOPE


def active(gates, configured) -> bool:
    """Whether code under ``gates`` runs when the ``configured`` names are (None: every name)."""
    return configured is None or all(gate & configured for gate in gates)


@dataclass(frozen=True)
class CodeIdentity:
    """The code a verb runs for one configuration: ``digest`` (sha256 of the counted statements'
    normalised syntax trees) and ``parts`` (module -> labels of its counted statements, for people)."""

    verb: str
    configured: frozenset
    digest: str
    parts: tuple

    def listing(self) -> str:
        lines = [f"{module}: {' '.join(labels)}" for module, labels in self.parts]
        return "\n".join([f"# verb {self.verb}; configured: {' '.join(sorted(self.configured))}", *lines]) + "\n"


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
        self.family_names, self.benchmark_names = self._registered()
        #: every registered name (families and benchmarks): what a gate is made of
        self.registered = self.family_names | self.benchmark_names
        #: per module, per top-level statement: (the imports in it, the names it uses with their gates,
        #: whether any of it is gated), from one walk
        self._scans = {name: [self._scan(name, stmt) for stmt in self.trees[name].body] for name in self.files}
        self.statement_imports = {name: [scan[0] for scan in scans] for name, scans in self._scans.items()}
        self.imports: dict[str, list[Import]] = {
            name: [imp for per in self.statement_imports[name] for imp in per] for name in self.files
        }
        self._info = {name: self._module_info(name) for name in self.files}
        self._canonical_cache: dict = {}

    def is_package(self, module: str) -> bool:
        return self.files[module].name == "__init__.py"

    def parents(self, module: str) -> list[str]:
        """The packages whose ``__init__`` runs before ``module``: ``a``, ``a.b`` for ``a.b.c``."""
        parts = module.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in self.files]

    # --- parsing

    def _registered(self) -> tuple[frozenset, frozenset]:
        """The family and benchmark names ``choices`` registers (empty for a package without it)."""
        module, families, benchmarks = REGISTRY
        tree = self.trees.get(f"{self.name}.{module}")
        values = {}
        for stmt in tree.body if tree else []:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                if stmt.targets[0].id in (families, benchmarks):
                    values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        bench = values.get(benchmarks, {})
        return frozenset(values.get(families, ())), frozenset(n for names in bench.values() for n in names)

    def _gate_of(self, test) -> tuple:
        """(the names a branch's body runs for, those its ``else`` runs for), None where not gated."""
        if isinstance(test, ast.Compare) and len(test.ops) == 1:
            op, sides = test.ops[0], (test.left, test.comparators[0])
            consts = [s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)]
            if isinstance(op, (ast.Eq, ast.NotEq)) and len(consts) == 1 and consts[0] in self.registered:
                gate = frozenset(consts)
                return (gate, None) if isinstance(op, ast.Eq) else (None, gate)
            if isinstance(op, (ast.In, ast.NotIn)) and isinstance(sides[1], (ast.Tuple, ast.List, ast.Set)):
                elts = sides[1].elts
                if elts and all(isinstance(e, ast.Constant) and e.value in self.registered for e in elts):
                    gate = frozenset(e.value for e in elts)
                    return (gate, None) if isinstance(op, ast.In) else (None, gate)
        if isinstance(test, ast.BoolOp):
            gates = [self._gate_of(v)[0] for v in test.values]
            if isinstance(test.op, ast.And) and any(gates):
                return next(g for g in gates if g), None
            if isinstance(test.op, ast.Or) and all(gates):
                return frozenset().union(*gates), None
        return None, None

    def _branches(self, node):
        """For a gated node (``if``, conditional expression, dict): (child nodes, extra gate) pairs in
        source order; None for any other node."""
        if isinstance(node, (ast.If, ast.IfExp)):
            body_gate, else_gate = self._gate_of(node.test)
            body = node.body if isinstance(node.body, list) else [node.body]
            orelse = node.orelse if isinstance(node.orelse, list) else [node.orelse]
            return [(node.test, None)] + [(c, body_gate) for c in body] + [(c, else_gate) for c in orelse]
        if isinstance(node, ast.Dict):
            out = []
            for key, value in zip(node.keys, node.values):
                registered = isinstance(key, ast.Constant) and key.value in self.registered
                out += [(key, None)] if key is not None else []
                out.append((value, frozenset({key.value}) if registered else None))
            return out
        return None

    def _walk(self, node, gates=(), skip=None):
        """Every node under ``node`` (itself first, then depth first in source order) with the gates
        it sits under; ``skip(parent, child)`` prunes a subtree."""
        todo = [(node, gates)]
        while todo:
            node, gates = todo.pop()
            yield node, gates
            branches = self._branches(node)
            children = branches if branches is not None else [(c, None) for c in ast.iter_child_nodes(node)]
            todo += [
                (child, gates + (gate,) if gate else gates)
                for child, gate in reversed(children)
                if skip is None or not skip(node, child)
            ]

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

    def _in_package(self, dotted: str) -> bool:
        return dotted == self.name or dotted.startswith(self.name + ".")

    def _scan(self, module: str, stmt) -> tuple[list[Import], set, bool]:
        """One top-level statement of ``module``: the imports in it (see the module docstring), the
        names it uses (with the gates each use sits under) and whether any of it is gated. In cli.py
        the ``set_defaults(func=...)`` of each verb's parser is no use of that verb's function."""
        imports, uses, gated = [], set(), False
        string_ref = re.compile(rf"({re.escape(self.name)}(?:\.\w+)*)(?::(\w+))?")
        scope = stmt.name if isinstance(stmt, _DEFS) else MODULE_SCOPE
        cli = module == f"{self.name}.{CLI}"

        def skip(parent, child):
            return (
                cli
                and isinstance(parent, ast.Call)
                and isinstance(parent.func, ast.Attribute)
                and parent.func.attr == "set_defaults"
                and isinstance(child, ast.keyword)
                and child.arg == "func"
            )

        for node, gates in self._walk(stmt, skip=skip):
            gated = gated or bool(gates)
            if isinstance(node, ast.Name):
                uses.add((node.id, gates))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    target = self._longest_module(alias.name)
                    if target:
                        imports.append(Import(module, target, (), node.lineno, scope, "import", gates))
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(module, node.level, node.module)
                if not self._in_package(base):
                    continue
                names = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in self.files:
                        imports.append(Import(module, sub, (), node.lineno, scope, "import", gates))
                    else:
                        names.append(alias.name)
                if base in self.files and names:  # (a package whose submodules alone are named still runs: parents())
                    imports.append(Import(module, base, tuple(names), node.lineno, scope, "import", gates))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                m = string_ref.fullmatch(node.value)
                if m and m.group(1) in self.files and (m.group(1) != self.name or m.group(2)):  # not the bare name
                    names = (m.group(2),) if m.group(2) else ()
                    imports.append(Import(module, m.group(1), names, node.lineno, scope, "string", gates))
        return imports, uses, gated

    # --- queries

    def closure(self, roots, opaque=(), configured=None, blocked=()) -> set[str]:
        """``roots`` and every module they import, transitively, with the packages on the way; the
        imports of an ``opaque`` module are not followed (the caller chose which of them count), nor
        those in code of names not ``configured`` (None: every name), and ``blocked`` modules are
        not entered."""
        seen, todo = set(), [r for r in roots if r not in blocked]
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            if module not in self.files:
                raise KeyError(f"no module {module!r} in {self.dir}")
            seen.add(module)
            todo += [p for p in self.parents(module) if p not in blocked]
            if module not in opaque:
                todo += [
                    imp.target
                    for imp in self.imports[module]
                    if active(imp.gates, configured) and imp.target not in blocked
                ]
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
        for stmt in sorted(
            (s for s in ast.walk(self.trees[cli]) if isinstance(s, (ast.Assign, ast.Expr))),
            key=lambda s: (s.lineno, s.col_offset),
        ):
            call = stmt.value
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
                continue
            if (
                call.func.attr == "add_parser"
                and isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and call.args
                and isinstance(call.args[0], ast.Constant)
            ):
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

    def function_imports(self, module: str, function: str, configured=None) -> set[str]:
        """What ``function`` of ``module`` imports, with the same-module functions it calls (transitively)."""
        functions = self.top_level_functions(module)
        seen, todo, targets = set(), [function], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            targets |= {
                imp.target for imp in self.imports[module] if imp.scope == name and active(imp.gates, configured)
            }
            todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions]
        return targets

    def _verb_function(self, verb: str) -> str:
        verbs = self.verbs()
        if verb not in verbs:
            raise KeyError(f"cli.py has no verb {verb!r}; verbs: {sorted(verbs)}")
        return verbs[verb]

    def verb_roots(self, verb: str, configured=None) -> set[str]:
        """The modules cli.py's part of ``unisparse <verb>`` imports (see the module docstring)."""
        cli = f"{self.name}.{CLI}"
        func = self._verb_function(verb)
        roots = {cli} | {imp.target for imp in self.imports[cli] if not imp.function_level}
        roots |= {f"{self.name}.__main__"} & set(self.files)  # `python -m unisparse` (torchrun)
        functions = self.top_level_functions(cli)
        if "main" in functions:
            roots |= {imp.target for imp in self.imports[cli] if imp.scope == "main" and active(imp.gates, configured)}
        if func in functions:
            roots |= self.function_imports(cli, func, configured)
        else:  # a function cli.py imports: the whole module that defines it
            roots |= {self.origin(imp.target, func) for imp in self.imports[cli] if func in imp.names}
        return roots

    def verb_modules(self, verb: str, configured=None) -> set[str]:
        """The modules ``unisparse <verb>`` runs (see the module docstring); ``configured``: the
        registered names whose code counts (None: all)."""
        return self.closure(self.verb_roots(verb, configured), opaque={f"{self.name}.{CLI}"}, configured=configured)

    def source_files(self, modules) -> list[Path]:
        return sorted(self.files[m] for m in modules)

    # --- families and benchmarks

    def configured(self, family=None, benchmarks=None) -> frozenset:
        """The registered names one configuration runs: its family (None: every family) and its
        benchmarks (None: every benchmark); an unregistered name is a ValueError naming it."""
        if family is not None and family not in self.family_names:
            raise ValueError(f"unknown model family {family!r}; registered: {sorted(self.family_names)}")
        benchmarks = None if benchmarks is None else set(benchmarks)
        unknown = sorted((benchmarks or set()) - self.benchmark_names)
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; registered: {sorted(self.benchmark_names)}")
        return frozenset(self.family_names if family is None else {family}) | frozenset(
            self.benchmark_names if benchmarks is None else benchmarks
        )

    def entry_modules(self, name: str) -> set[str]:
        """The modules code selected for the registered ``name`` imports (its gated imports' targets)."""
        return {
            imp.target
            for imps in self.imports.values()
            for imp in imps
            if imp.gates and any(name in gate for gate in imp.gates)
        }

    def owned_modules(self, name: str) -> set[str]:
        """The modules only ``name``'s entry modules reach: not loaded by any verb when no registered
        name is configured, other than through those entry modules."""
        entries = self.entry_modules(name)
        cli = f"{self.name}.{CLI}"
        core = set()
        for verb in set(self.verbs()):
            roots = self.verb_roots(verb, frozenset())
            core |= self.closure(roots, opaque={cli}, configured=frozenset(), blocked=entries)
        return self.closure(entries) - core

    # --- code identity

    def _module_info(self, module: str) -> dict:
        """Per module: name -> indices of the top-level statements binding it; the statements that
        count whenever the module is loaded (effects); whether the module counts whole (its names
        cannot be followed statically)."""
        body = self.trees[module].body
        defines, external = defaultdict(list), set()
        for i, stmt in enumerate(body):
            for name in _bound(stmt):
                defines[name].append(i)
            for node in [stmt] if isinstance(stmt, _DEFS) else ast.walk(stmt):  # imports of other packages
                if isinstance(node, ast.Import):
                    external |= {a.asname or a.name.split(".")[0] for a in node.names if not self._in_package(a.name)}
                elif isinstance(node, ast.ImportFrom):
                    if not self._in_package(self._absolute(module, node.level, node.module)):
                        external |= {a.asname or a.name for a in node.names}
        own = set(defines) - external
        effects = [i for i, stmt in enumerate(body) if _has_effect(stmt, own)]
        dynamic = any(
            (isinstance(n, ast.Name) and n.id in _DYNAMIC_NAMES)
            or (isinstance(n, _DEFS) and n.name in _DYNAMIC_DEFS)
            or (isinstance(n, ast.ClassDef) and any(k.arg == "metaclass" for k in n.keywords))
            or (isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names))
            for n in ast.walk(self.trees[module])
        )
        future = sorted(
            a.name for s in body if isinstance(s, ast.ImportFrom) and s.module == "__future__" for a in s.names
        )
        return {"defines": dict(defines), "effects": effects, "dynamic": dynamic, "future": future}

    def _uses(self, module: str, index: int, configured) -> set[str]:
        """The names a top-level statement uses in code that runs for ``configured``."""
        return {name for name, gates in self._scans[module][index][1] if active(gates, configured)}

    def canonical(self, module: str, index: int, configured) -> str:
        """One top-level statement's meaning as text: its syntax tree without positions, docstrings
        (any statement that is a bare constant), argparse ``help=`` texts and the code of branches
        that run for names not ``configured`` (each becomes ``...``); stable across Python versions
        (fields that are empty or None are left out)."""
        stmt = self.trees[module].body[index]
        key = (module, index, configured if self._scans[module][index][2] else None)
        if key not in self._canonical_cache:
            self._canonical_cache[key] = self._canon(stmt, configured, ())
        return self._canonical_cache[key]

    def _canon(self, node, configured, gates) -> str:
        if not isinstance(node, ast.AST):
            return repr(node)
        if not active(gates, configured):
            return "..."  # code that does not run for this configuration
        if isinstance(node, ast.keyword) and node.arg == "help" and isinstance(node.value, ast.Constant):
            return "keyword(arg='help',value=...)"
        branch = {id(child): gate for child, gate in (self._branches(node) or []) if gate}

        def one(child):
            inner = gates + ((branch[id(child)],) if id(child) in branch else ())
            return self._canon(child, configured, inner)

        fields = []
        for field in node._fields:
            if field in ("kind", "type_comment"):  # u"" prefixes and `# type:` comments: formatting
                continue
            value = getattr(node, field, None)
            if value is None or value == []:
                continue
            if isinstance(value, list):
                kept = [v for v in value if not (isinstance(v, ast.Expr) and isinstance(v.value, ast.Constant))]
                texts = []
                for v in kept:  # a run of import statements by what it binds: sorting them changes nothing
                    runs = active(gates + ((branch[id(v)],) if id(v) in branch else ()), configured)
                    if isinstance(v, (ast.Import, ast.ImportFrom)) and runs:
                        if not (texts and isinstance(texts[-1], set)):
                            texts.append(set())
                        texts[-1] |= _import_bindings(v)
                    else:
                        texts.append(one(v))
                texts = [f"imports{sorted(t)}" if isinstance(t, set) else t for t in texts]
                text = "..." if texts and set(texts) == {"..."} else "[" + ",".join(texts) + "]"
            else:
                text = one(value)
            fields.append(f"{field}={text}")
        return f"{type(node).__name__}({','.join(fields)})"

    def identity(self, verb: str, configured=None) -> CodeIdentity:
        """The code ``unisparse <verb>`` runs when ``configured`` names are (see the module docstring)."""
        configured = self.configured() if configured is None else frozenset(configured)
        counted = _Slice(self, configured)
        cli = f"{self.name}.{CLI}"
        func = self._verb_function(verb)
        counted.load(cli)
        for name in ("main", func):
            if name in self._info[cli]["defines"]:
                counted.need(cli, name)
        if f"{self.name}.__main__" in self.files:  # `python -m unisparse` (torchrun)
            counted.whole(f"{self.name}.__main__")
        h = hashlib.sha256(f"{IDENTITY_FORMAT}\n".encode())
        parts = []
        for module in sorted(set(counted.included) | set(counted.bindings)):
            indices = sorted(counted.included.get(module, ()))
            # imports by what they bind (sorted): sorting or merging import statements changes nothing
            bindings = sorted(counted.bindings.get(module, ()))
            h.update(f"module {module} future {self._info[module]['future']}\n".encode())
            for text in bindings + [self.canonical(module, i, configured) for i in indices]:
                h.update(text.encode() + b"\n")
            body = self.trees[module].body
            imported = sorted({b.split("=", 1)[0] for b in bindings})
            parts.append(
                (
                    module,
                    tuple(([f"import:{','.join(imported)}"] if imported else []) + [_label(body[i]) for i in indices]),
                )
            )
        return CodeIdentity(verb, configured, h.hexdigest(), tuple(parts))


class _Slice:
    """The statements one verb's code counts (``Package.identity``): loads, uses, whole modules."""

    def __init__(self, pkg: Package, configured: frozenset):
        self.pkg, self.configured = pkg, configured
        self.loaded: set[str] = set()
        self.included: dict[str, set[int]] = defaultdict(set)  # module -> counted statements (not imports)
        self.bindings: dict[str, set[str]] = defaultdict(set)  # module -> counted import bindings
        self.done: set = set()  # (module, statement, name or None) already followed

    def load(self, module: str) -> None:
        """``module`` is imported: its parents and module-level imports run, its effects count."""
        if module in self.loaded:
            return
        self.loaded.add(module)
        for parent in self.pkg.parents(module):
            self.load(parent)
        info = self.pkg._info[module]
        if info["dynamic"]:
            self.whole(module)
            return
        for i, stmt in enumerate(self.pkg.trees[module].body):
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                for imp in self.pkg.statement_imports[module][i]:
                    self.load(imp.target)
        for i in info["effects"]:
            self.include(module, i)

    def whole(self, module: str) -> None:
        self.load(module)
        for i in range(len(self.pkg.trees[module].body)):
            self.include(module, i)

    def need(self, module: str, name: str) -> None:
        """Code that counts uses ``name`` of ``module``: the statements binding it count."""
        self.load(module)
        indices = self.pkg._info[module]["defines"].get(name)
        if not indices:
            # a submodule as an attribute of its package, or a name bound some way not followed here
            self.whole(f"{module}.{name}" if f"{module}.{name}" in self.pkg.files else module)
        for i in indices or ():
            self.include(module, i, name)

    def include(self, module: str, index: int, name: str | None = None) -> None:
        stmt = self.pkg.trees[module].body[index]
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self._include_import(module, index, stmt, name)
            return
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            return  # a docstring: no meaning
        if (module, index, None) in self.done:
            return
        self.done.add((module, index, None))
        self.included[module].add(index)
        defined = self.pkg._info[module]["defines"]
        for used in sorted(self.pkg._uses(module, index, self.configured)):
            if used in defined:
                self.need(module, used)
        for imp in self.pkg.statement_imports[module][index]:
            if not active(imp.gates, self.configured):
                continue
            self.load(imp.target)
            if imp.names:
                for n in imp.names:
                    self.need(imp.target, n)
            else:
                self.whole(imp.target)

    def _include_import(self, module, index, stmt, name) -> None:
        """A top-level import statement binding ``name`` (None: all it binds) counts: the bindings
        count (as ``name=module:attribute``) and the package's modules they name."""
        if (module, index, name) in self.done or (module, index, None) in self.done:
            return
        self.done.add((module, index, name))
        pkg = self.pkg
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                bound = alias.asname or alias.name.split(".")[0]
                if name is None or bound == name:
                    self.bindings[module].add(f"{bound}={alias.name}" + ("" if alias.asname else " (package)"))
                    target = pkg._longest_module(alias.name) if pkg._in_package(alias.name) else None
                    if target:
                        self.whole(target)
            return
        base = pkg._absolute(module, stmt.level, stmt.module)
        for alias in stmt.names:
            bound = alias.asname or alias.name
            if name is not None and bound != name:
                continue
            self.bindings[module].add(f"{bound}={base}:{alias.name}")
            if not pkg._in_package(base):
                continue
            if f"{base}.{alias.name}" in pkg.files:
                self.whole(f"{base}.{alias.name}")
            elif base in pkg.files:
                self.need(base, alias.name)


def _bound(stmt) -> set[str]:
    """The names a top-level statement binds in its module."""
    if isinstance(stmt, _DEFS):
        return {stmt.name}
    if isinstance(stmt, ast.Import):
        return {a.asname or a.name.split(".")[0] for a in stmt.names}
    if isinstance(stmt, ast.ImportFrom):
        return {a.asname or a.name for a in stmt.names if a.name != "*"}
    names = set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, _DEFS):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= _bound(node)
    return names


def _import_bindings(stmt) -> set[str]:
    """What an import statement binds, one ``name=level module:attribute`` each."""
    if isinstance(stmt, ast.Import):
        return {f"{a.asname or a.name.split('.')[0]}={a.name}" + ("" if a.asname else " (package)") for a in stmt.names}
    return {f"{a.asname or a.name}={'.' * stmt.level}{stmt.module or ''}:{a.name}" for a in stmt.names}


def _plain_target(target) -> bool:
    if isinstance(target, ast.Name):
        return True
    if isinstance(target, ast.Starred):
        return _plain_target(target.value)
    return isinstance(target, (ast.Tuple, ast.List)) and all(_plain_target(t) for t in target.elts)


def _has_effect(stmt, own_names) -> bool:
    """Whether a top-level statement does more, when its module is imported, than bind names: a
    bare expression other than a constant, an assignment to an attribute or item, a compound
    statement, a definition under a decorator the module defines or imports from its package."""
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Pass)):
        return False
    if isinstance(stmt, ast.Expr):
        return not isinstance(stmt.value, ast.Constant)
    if isinstance(stmt, _DEFS):
        return any(isinstance(n, ast.Name) and n.id in own_names for d in stmt.decorator_list for n in ast.walk(d))
    if isinstance(stmt, ast.Assign):
        return not all(_plain_target(t) for t in stmt.targets)
    if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        return not _plain_target(stmt.target)
    return True


def _label(stmt) -> str:
    """A short name for a counted statement (the digest file's listing; no line numbers, so that
    the file's content changes only with the digest)."""
    names = sorted(_bound(stmt))
    if names and not isinstance(stmt, (ast.If, ast.Try, ast.For, ast.While, ast.With, ast.Expr)):
        return ",".join(names)
    return f"<{type(stmt).__name__.lower()}>"


@lru_cache(maxsize=None)
def package(package_dir=PACKAGE_DIR) -> Package:
    """The parsed package at ``package_dir`` (cached per directory: one parse per DAG build)."""
    return Package(package_dir)


def verb_sources(verb: str, package_dir="src/unisparse", family=None, benchmarks=None) -> list[str]:
    """The source files ``unisparse <verb>`` may load, as paths under ``package_dir`` (sorted); with
    ``family`` / ``benchmarks`` given, without the code of the other families / benchmarks."""
    pkg = package(str(package_dir))
    configured = None if family is None and benchmarks is None else pkg.configured(family, benchmarks)
    return [
        f"{Path(package_dir).as_posix()}/{path.relative_to(pkg.dir).as_posix()}"
        for path in pkg.source_files(pkg.verb_modules(verb, configured))
    ]


def module_sources(module: str, package_dir=PACKAGE_DIR) -> list[Path]:
    """The source files of ``module`` (e.g. ``"unisparse.worlds.shapes"``) and everything it imports."""
    pkg = package(str(package_dir))
    return pkg.source_files(pkg.closure([module]))


@lru_cache(maxsize=None)
def _identity(package_dir: str, verb: str, configured: frozenset) -> CodeIdentity:
    return package(package_dir).identity(verb, configured)


def code_identity(verb: str, package_dir=PACKAGE_DIR, family=None, benchmarks=None) -> CodeIdentity:
    """The code ``unisparse <verb>`` runs for a model of ``family`` scored on ``benchmarks`` (None:
    every family / benchmark), as a digest of its meaning (see the module docstring)."""
    pkg = package(str(package_dir))
    return _identity(str(package_dir), verb, pkg.configured(family, benchmarks))


def identity_file_name(verb: str, family: str, benchmarks) -> str:
    return f"{verb}-{family}-{'+'.join(sorted(set(benchmarks)))}.sha256"


def write_code_identity(verb: str, out_dir, package_dir="src/unisparse", family: str = "mot", benchmarks=()) -> str:
    """The digest file of ``code_identity`` under ``out_dir`` (its path): the digest on the first line,
    then what it covers. Rewritten only when the digest differs, so its modification time moves only
    when the code's meaning does (atomically: ``.NAME.tmp-HOST-PID``, then a rename). A file written
    for the first time carries the modification time of the newest source it covers, so that
    outputs made after the code's last edit stay up to date, as they were when sources were inputs."""
    identity = code_identity(verb, package_dir, family, benchmarks)
    path = Path(out_dir) / identity_file_name(verb, family, benchmarks)
    first = f"{IDENTITY_FORMAT} sha256:{identity.digest}"
    try:
        with open(path) as f:
            if f.readline().rstrip("\n") == first:
                return str(path)
        existed = True
    except FileNotFoundError:
        existed = False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_text(f"{first}\n{identity.listing()}")
    if not existed:
        files = package(str(package_dir)).files
        newest = max(os.stat(files[module]).st_mtime for module, _ in identity.parts)
        os.utime(tmp, (newest, newest))
    os.replace(tmp, path)
    return str(path)
