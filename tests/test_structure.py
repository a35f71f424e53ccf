"""The package's shape, as a newcomer meets it: imports that run one way (function-level ones included), files
a reader takes in at one sitting, one episode loop."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "refinevla"
MAX_LINES = 520  # "no module over ~500 lines"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every refinevla module ``name`` imports anywhere in its file (top level, inside functions or classes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from .pkg import sub` names a submodule when one exists, else a name inside the module
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # refinevla.x.y (a name in module x) -> refinevla.x
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports (a list of modules, first == last), or None. A package's __init__ importing its own
    submodules is the one expected direction; a submodule importing its package back closes a cycle."""
    state, stack = {}, []

    def visit(node):
        state[node], _ = "open", stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package_function_level_imports_included():
    graph = import_graph()
    assert "refinevla.config" in graph and graph["refinevla.pipeline"], "the walker found the package"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_function_level_import_counts(tmp_path):
    pkg = tmp_path / "refinevla"
    pkg.mkdir()
    (pkg / "one.py").write_text("def f():\n    from .two import g\n    return g\n")
    (pkg / "two.py").write_text("import numpy\n")
    known = {"refinevla.one", "refinevla.two"}
    assert imports_of("refinevla.one", pkg / "one.py", known) == {"refinevla.two"}


def test_every_module_reads_in_one_sitting():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_one_episode_loop():
    defs = [name for name, path in modules().items()
            if any(isinstance(n, ast.FunctionDef) and n.name == "run_episode" for n in ast.walk(ast.parse(path.read_text())))]
    assert defs == ["refinevla.rollout"], defs
