"""The house is one-way: the import graph of ``loradeploy/`` (every import statement, function-local
and ``TYPE_CHECKING`` ones included) has no cycle, and no import goes up the layer table of
docs/architecture.md, which this test reads (the table lives there, once). Every module is in
exactly one layer, and a runtime's plugin folder imports no other plugin folder."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "loradeploy"
DOC = REPO / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|$")


def layer_table(text: str) -> list[tuple[str, list[str]]]:
    """(layer name, module patterns) bottom to top, from the table between the ``layers`` markers:
    ``| n | name | `pattern` `pattern` … | rule |``; patterns are module names below ``loradeploy``
    (``quant.*``: the package and everything in it)."""
    block = text.split("<!-- layers -->", 1)[1].split("<!-- /layers -->", 1)[0]
    rows = [ROW.match(line.strip()) for line in block.splitlines()]
    rows = [m for m in rows if m and m.group(1).isdigit()]
    assert [int(m.group(1)) for m in rows] == list(range(1, len(rows) + 1)), "layers numbered 1, 2, … bottom to top"
    return [(m.group(2), re.findall(r"`([^`]+)`", m.group(3))) for m in rows]


def modules(package: Path) -> dict[str, Path]:
    """Dotted name (without the top package) → file; a package's ``__init__`` is the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(package: Path, names: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(importer, imported module, line) for every import of a module of the package (the package's
    ``__init__`` as ``""``); ``from . import x`` imports module ``x`` when there is one, else the
    package; a name inside a module stands for its module."""
    top = package.name

    def module_of(full: str) -> str | None:
        if full != top and not full.startswith(top + "."):
            return None
        dotted = full[len(top) + 1:]
        while dotted and dotted not in names:
            dotted = dotted.rpartition(".")[0]
        return dotted

    edges = set()
    for name, path in names.items():
        here = [top, *name.split(".")] if name else [top]
        parent = here if path.name == "__init__.py" else here[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [module_of(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = parent[:len(parent) - node.level + 1] if node.level else []
                mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
                targets = [module_of(f"{mod}.{a.name}") if module_of(f"{mod}.{a.name}") != module_of(mod)
                           else module_of(mod) for a in node.names]
            else:
                continue
            edges.update((name, t, node.lineno) for t in targets if t is not None and t != name)
    return sorted(edges)


def cycles(names, edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {n: sorted({b for a, b, _ in edges if a == n}) for n in names}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys
    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return sorted(out)


def layer_of(table, name: str) -> list[int]:
    return [i for i, (_, patterns) in enumerate(table)
            if any(name == p or fnmatch.fnmatchcase(name, p) or (p.endswith(".*") and name == p[:-2])
                   for p in patterns)]


def problems(package: Path, table) -> list[str]:
    names = modules(package)
    out = []
    for name in names:
        at = layer_of(table, name or "__init__")
        if len(at) != 1:
            out.append(f"{name or '__init__'}: in {len(at)} layers of the table (must be in exactly one)")
    edges = imports(package, names)
    for comp in cycles(names, edges):
        out.append("import cycle: " + " → ".join(comp))
    for a, b, line in edges:
        la, lb = layer_of(table, a or "__init__"), layer_of(table, b or "__init__")
        if len(la) == 1 and len(lb) == 1 and lb[0] > la[0]:
            out.append(f"{a}:{line} imports {b}: up from {table[la[0]][0]} to {table[lb[0]][0]}")
        pa, pb = a.split("."), b.split(".")
        if pa[0] == pb[0] == "plugins" and len(pa) > 1 and len(pb) > 1 and pa[1] != pb[1]:
            out.append(f"{a}:{line} imports {b}: one plugin folder imports another")
    return out


def test_the_import_graph_has_no_cycle_and_points_down():
    table = layer_table(DOC.read_text())
    assert problems(PACKAGE, table) == []


def test_every_module_is_at_most_400_lines():
    long = {p.relative_to(REPO).as_posix(): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_checks_find_a_cycle_an_upward_import_and_a_plugin_importing_another(tmp_path):
    pkg = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", "low.py": "def f():\n    from .high import g\n",
                      "high.py": "from . import low\n", "mid.py": "from .low import f\n",
                      "plugins/__init__.py": "", "plugins/a/__init__.py": "", "plugins/b/__init__.py": "",
                      "plugins/a/x.py": "from ..b import y\n", "plugins/b/y.py": "import pkg.mid\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    table = [("low", ["low"]), ("mid", ["mid"]), ("plugins", ["plugins.*"]), ("high", ["high", "__init__"])]
    found = problems(pkg, table)
    assert "import cycle: high → low" in found
    assert "low:2 imports high: up from low to high" in found
    assert "plugins.a.x:1 imports plugins.b.y: one plugin folder imports another" in found
    assert not any(p.startswith("mid:") or p.startswith("plugins.b.y") for p in found), found
    unplaced = problems(pkg, table[:-1])
    assert {"__init__: in 0 layers of the table (must be in exactly one)",
            "high: in 0 layers of the table (must be in exactly one)"} <= set(unplaced)
