"""The project's import graph, read from the source (ast): no cycle, and no hidden import in library code.

Every `import` of a project module counts, at the top of a file or inside a function. Library code
(everything but the command line) imports the project's own modules at the top only, except a module
kept apart because it loads a heavy optional dependency (the Triton kernels), whose import says why:
``# noqa: PLC0415  (reason)``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _packages() -> dict[str, str]:
    """{source folder: package name} from pyproject.toml's `package-dir`."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    line = re.search(r"^package-dir = \{(.*)\}$", text, re.M).group(1)
    return {folder: pkg for pkg, folder in re.findall(r'"([\w.]+)" = "(\w+)"', line)}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in _packages().items():
        for f in sorted((ROOT / folder).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(project module imported, line, inside a function) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body} | {
        id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try)) for n in ast.walk(s)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import attnedit.x.y` imports the module attnedit.x.y, `from m import f` m
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno, id(node) not in top))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _, _ in GRAPH[v]:
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
                found.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_project():
    assert {"attnedit", "attnedit.recipe", "attnedit.interventions.registry", "attnedit.cli.main"} <= set(MODULES)
    assert ("attnedit.interventions.registry", 1, False) in [(t, 1, local) for t, _, local in GRAPH["attnedit.recipe"]]


def test_no_import_cycle_among_the_project_modules():
    cycles = _cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _says_why(name: str, line: int) -> bool:
    """The import line carries ``# noqa: PLC0415  (reason)``: a module kept apart for a heavy optional dependency."""
    return _gives_reason(MODULES[name].read_text(encoding="utf-8").splitlines()[line - 1])


def _gives_reason(text: str) -> bool:
    return re.search(r"#\s*noqa:[\w, ]*PLC0415\s+\(\w[^)]*\)", text) is not None


def test_library_code_imports_the_project_at_the_top():
    hidden = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target} inside a function"
        for name, imports in GRAPH.items()
        if not name.startswith("attnedit.cli")
        for target, line, local in imports
        if local and not _says_why(name, line)
    ]
    assert not hidden, "\n".join(hidden)
    assert _gives_reason("    from . import triton_ops  # noqa: F401, PLC0415  (Triton: optional)")
    assert not _gives_reason("    from . import triton_ops  # noqa: PLC0415")


def test_the_library_never_imports_the_command_line():
    up = [
        f"{name} imports {target}"
        for name, imports in GRAPH.items()
        if not name.startswith("attnedit.cli")
        for target, _, _ in imports
        if target.startswith("attnedit.cli")
    ]
    assert not up, "\n".join(up)
