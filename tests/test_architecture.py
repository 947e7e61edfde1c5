"""The floor plan of the torchprune package, checked from its source with ``ast`` (nothing is
imported, so a broken or circular import cannot hide a finding, and the checks take well under a
second).

Four rules (house review and STYLE.md, "Layers, not a web"), one test each, every failure naming
the modules and lines:

1. No import circle among torchprune modules. Module-level AND function-level imports both count:
   a function-level import that exists only to dodge a circle is still an edge of the circle.
2. No upward import across the floors of the layered layout: every module gets a floor from
   FLOORS (a module path prefix under torchprune/ -> floor number; the target layout of the
   restructuring) and may import only modules on a lower floor or in its own FLOORS entry (its
   own package). A module that FLOORS does not cover fails its own test, so that a new module is
   given a floor when it is added.
3. No private name (``_x``, not a dunder) imported from another torchprune module
   (``from .m import _x``), and no ``m._x`` read on an imported torchprune module ``m``. A helper
   two modules need is public inside the package (no underscore; it need not be in ``__all__``).
   Private *modules* (``_version``, ``_C``) may be imported.
4. No function or method in torchprune/ over MAX_FUNCTION_LINES lines (from the ``def`` line to
   its last line, docstring included) unless its docstring says why, with the phrase
   "Long because" (e.g. "Long because the five argument checks must all run before any mutation").

Edges are the explicit imports, resolved to the most specific module: ``from .x import y`` is an
edge to ``x.y`` when that is a module, else to ``x``; the parent packages that Python loads on
the way (``__init__.py``) are not counted, or every module would sit in a circle with the face.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "torchprune"
PACKAGE = "torchprune"
MAX_FUNCTION_LINES = 60
LONG_BECAUSE = "Long because"

# Module path prefix (relative to torchprune/; a folder ends in "/") -> floor. Mirrors the target
# layout of the restructuring (issue 12). A module may import lower floors and its own entry.
# Not in the layout, chosen here: _version.py 0 (a leaf), the face __init__.py 13 (it re-exports
# every floor) and __main__.py 14 (the command line, above the face).
FLOORS = {
    "_version.py": 0,
    "errors.py": 1, "ops/": 1, "selection.py": 1, "state.py": 1, "timing.py": 1, "schedules.py": 1, "distributed.py": 1,
    "progress.py": 1,
    "nn/": 2,
    "layer_types.py": 3, "masking.py": 3, "regrowth.py": 3,
    "calibration.py": 4,
    "importance/": 5,
    "targets.py": 6, "sequential.py": 6,
    "structured/": 7, "regularize.py": 7, "owl.py": 7,
    "oneshot.py": 8,
    "channel_pruner.py": 9, "sparsify.py": 9,
    "pruner.py": 10,
    "analysis/": 11, "io.py": 11, "progressive.py": 11, "recovery/": 11, "integrations/": 11,
    "demo/": 12, "sensitivity.py": 12, "compress/": 12,
    "__init__.py": 13,
    "__main__.py": 14,
}


# ---------------------------------------------------------------------------------------------
# reading the package


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every torchprune module: dotted name -> file."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


@lru_cache(maxsize=None)
def tree(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def relative(name: str) -> str:
    """torchprune/structured/graph.py for torchprune.structured.graph."""
    return str(modules()[name].relative_to(ROOT.parent))


def package_of(name: str) -> str:
    """The package a relative import in module ``name`` starts from."""
    return name if modules()[name].name == "__init__.py" else name.rpartition(".")[0]


class Import:
    """One import statement's edge: importer, imported module, line, the names it takes, and
    whether it sits inside a function."""

    def __init__(self, source: str, target: str, line: int, names: list[str], in_function: bool):
        self.source, self.target, self.line, self.names, self.in_function = source, target, line, names, in_function

    def where(self) -> str:
        return f"{relative(self.source)}:{self.line}"


def resolve(name: str, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from`` import names (None: not torchprune)."""
    if node.level:
        base = package_of(name).split(".")
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module if node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")) else None


class Scan:
    """What one pass over a module's tree finds: import statements (node, inside a function?),
    ``name.attr`` reads and function definitions."""

    def __init__(self, module: ast.Module):
        self.imports: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self.attributes: list[ast.Attribute] = []
        self.functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
        self.visit(module, False)

    def visit(self, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                self.imports.append((child, in_function))
            elif isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name):
                self.attributes.append(child)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.append(child)
            self.visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


@lru_cache(maxsize=None)
def scan(name: str) -> Scan:
    return Scan(tree(name))


@lru_cache(maxsize=None)
def imports() -> tuple[Import, ...]:
    """Every import of a torchprune module by a torchprune module, resolved to the most specific
    module (see the module docstring)."""
    known = modules()
    found = []
    for name in known:
        for node, in_function in scan(name).imports:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    if target.endswith("._C"):
                        continue  # the compiled extension
                    while target and target not in known:
                        target = target.rpartition(".")[0]
                    if target:
                        found.append(Import(name, target, node.lineno, [], in_function))
                continue
            base = resolve(name, node)
            if base is None:
                continue
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append(Import(name, sub, node.lineno, [], in_function))
                elif alias.name != "_C":  # the compiled extension: a leaf below every floor
                    plain.append(alias.name)
            if plain:
                target = base
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target:
                    found.append(Import(name, target, node.lineno, plain, in_function))
    return tuple(i for i in found if i.target != i.source)


# ---------------------------------------------------------------------------------------------
# 1. circles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(result)


def circles() -> list[str]:
    graph = defaultdict(set)
    for edge in imports():
        graph[edge.source].add(edge.target)
    found = []
    for component in strongly_connected(graph):
        members = set(component)
        edges = [e for e in imports() if e.source in members and e.target in members]
        lines = [f"  {e.where()} imports {e.target}{' (in a function)' if e.in_function else ''}" for e in edges]
        found.append(f"circle of {len(component)} modules: {', '.join(component)}\n" + "\n".join(lines))
    return found


def test_no_import_circles():
    found = circles()
    assert not found, f"{len(found)} import circle(s):\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# 2. floors


def floor_entry(name: str) -> str | None:
    """The FLOORS key that covers module ``name`` (the longest matching prefix), or None."""
    path = str(modules()[name].relative_to(ROOT).as_posix())
    matches = [key for key in FLOORS if path == key or (key.endswith("/") and path.startswith(key))]
    return max(matches, key=len) if matches else None


def test_every_module_has_a_floor():
    missing = [relative(name) for name in modules() if floor_entry(name) is None]
    assert not missing, (f"{len(missing)} module(s) without a floor; give each one in FLOORS "
                         f"(tests/test_architecture.py):\n  " + "\n  ".join(missing))


def upward_imports() -> list[str]:
    found = []
    for edge in imports():
        source, target = floor_entry(edge.source), floor_entry(edge.target)
        if source is None or target is None or source == target:
            continue  # no floor: test_every_module_has_a_floor says so; own entry: allowed
        if FLOORS[target] >= FLOORS[source]:
            kind = "upward" if FLOORS[target] > FLOORS[source] else "sideways (same floor, another entry)"
            found.append(f"  {edge.where()} ({source}, floor {FLOORS[source]}) imports {edge.target} "
                         f"({target}, floor {FLOORS[target]}): {kind}"
                         f"{' (in a function)' if edge.in_function else ''}")
    return found


def test_no_upward_imports():
    found = upward_imports()
    assert not found, (f"{len(found)} import(s) of a module on the same or a higher floor (FLOORS in "
                       f"tests/test_architecture.py):\n" + "\n".join(found))


# ---------------------------------------------------------------------------------------------
# 3. private names


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports() -> list[str]:
    found = []
    for edge in imports():
        for name in edge.names:
            if is_private(name):
                found.append(f"  {edge.where()} imports {name} from {edge.target}")
    # m._x on a name bound to a torchprune module by an import in this module
    for name in modules():
        bound = {}
        for node, _ in scan(name).imports:
            if isinstance(node, ast.ImportFrom) and (base := resolve(name, node)) is not None:
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules():
                        bound[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in modules():
                        bound[alias.asname] = alias.name
        for node in scan(name).attributes:
            owner = bound.get(node.value.id)
            if owner and owner != name and is_private(node.attr) and f"{owner}.{node.attr}" not in modules():
                found.append(f"  {relative(name)}:{node.lineno} reads {node.value.id}.{node.attr} of {owner}")
    return sorted(set(found))


def test_no_private_names_across_modules():
    found = private_imports()
    assert not found, (f"{len(found)} private name(s) used across modules; make each public inside the "
                       f"package (drop the underscore):\n" + "\n".join(found))


# ---------------------------------------------------------------------------------------------
# 4. long functions


def long_functions() -> list[str]:
    found = []
    for name in modules():
        for node in scan(name).functions:
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and LONG_BECAUSE not in (ast.get_docstring(node) or ""):
                found.append(f"  {relative(name)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_long_functions():
    found = long_functions()
    assert not found, (f"{len(found)} function(s) over {MAX_FUNCTION_LINES} lines without \"{LONG_BECAUSE}\" "
                       f"in the docstring:\n" + "\n".join(found))


def documented_floors() -> dict[str, int]:
    """The floor table of docs/architecture.md: ``| floor | `module` | ... |`` rows."""
    table = {}
    for line in (ROOT.parent / "docs" / "architecture.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit() and cells[1].startswith("`"):
            table[cells[1].strip("`")] = int(cells[0])
    return table


def test_the_documented_floors_are_the_enforced_ones():
    documented = documented_floors()
    assert documented == FLOORS, (
        "docs/architecture.md's floor table and FLOORS differ: "
        f"only in the docs {sorted(documented.items() - FLOORS.items())}, "
        f"only in FLOORS {sorted(FLOORS.items() - documented.items())}")
