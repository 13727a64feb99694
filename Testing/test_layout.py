"""The layout's import rules (docs/architecture.md), read from the code's own import statements.

- data/ imports none of ml/, review/, training/, benchmarks/;
- review/ (runs inside Slicer's Python) imports neither ml/ nor training/ nor benchmarks/, nor torch/monai at all;
- web/ (the review page's server) builds on review/ and likewise reaches neither the backend nor torch; review/
  never imports web/ (Slicer loads review/ without trame);
- nothing in the product (SSLSegmentLib/, training/, SSLSegment/) imports benchmarks/ at module level;
- the import graph has no circles, counting imports inside functions too (a lazy import hides a circle from the
  interpreter, not from the reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("SSLSegmentLib", "training", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    out["SSLSegment.SSLSegment"] = ROOT / "SSLSegment" / "SSLSegment.py"
    return out


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, all imports) of a file, as absolute module names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top, every = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        every.update(names)
    for node in tree.body:  # module level, including `if`/`try` blocks at the top
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                break
            if isinstance(sub, ast.Import):
                top.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                top.update([sub.module] + [f"{sub.module}.{a.name}" for a in sub.names])
    return top, every


SOURCES = _sources()
IMPORTS = {name: _imports(path) for name, path in SOURCES.items()}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _offenders(importer_prefix: str, forbidden: tuple[str, ...], level: int) -> dict[str, list[str]]:
    bad = {}
    for name, imports in IMPORTS.items():
        if _under(name, importer_prefix):
            hits = sorted(i for i in imports[level] if _under(i, *forbidden))
            if hits:
                bad[name] = hits
    return bad


def test_no_relative_imports_so_the_rules_below_see_every_import():
    rel = [str(p.relative_to(ROOT)) for p in SOURCES.values()
           if any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(ast.parse(p.read_text())))]
    assert not rel, f"relative imports in {rel}"


def test_data_depends_on_nothing_above_it():
    assert not _offenders("SSLSegmentLib.data", ("SSLSegmentLib.ml", "SSLSegmentLib.review", "training",
                                                 "benchmarks", "torch", "monai"), level=1)


@pytest.mark.parametrize("forbidden", [("SSLSegmentLib.ml", "training", "benchmarks", "torch", "monai")])
def test_review_never_reaches_torch_or_the_backend(forbidden):
    assert not _offenders("SSLSegmentLib.review", forbidden, level=1)


def test_the_review_page_builds_on_review_and_not_on_the_backend():
    assert not _offenders("SSLSegmentLib.web", ("SSLSegmentLib.ml", "training", "benchmarks", "torch", "monai"),
                          level=1)
    assert not _offenders("SSLSegmentLib.review", ("SSLSegmentLib.web",), level=1)


def test_the_product_does_not_import_the_research_harness_at_module_level():
    for prefix in ("SSLSegmentLib", "training", "SSLSegment"):
        assert not _offenders(prefix, ("benchmarks",), level=0), prefix


def test_no_import_circles():
    modules = set(SOURCES)
    graph = {}
    for name, (_, every) in IMPORTS.items():
        deps = set()
        for imp in every:
            # `from pkg import name` names a module when pkg.name is one; otherwise the package itself
            target = imp if imp in modules else imp.rsplit(".", 1)[0] if imp.rsplit(".", 1)[0] in modules else None
            if target and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                circles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
