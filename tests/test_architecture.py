"""The package's import graph: no cycles (imports inside functions count), the library apart.

A cycle held together by an import inside a function works until someone moves that import
to the top of the file; then one of the two modules is half-initialised when the other
reads from it. So every import statement counts, wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tvlars"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folder ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from every import statement in the file
    (module level, functions, methods, ``if TYPE_CHECKING`` blocks alike)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join(package + ([base] if base else []))
                # `from package import module` imports that module; `from module import name` the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a module a.b plus an attribute
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert "tvlars.harness.supervised.train" in graph and "tvlars.study.sweep" in graph  # the walk saw the tree
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_harness_or_the_study():
    graph = import_graph(PACKAGE)
    for name, targets in graph.items():
        if name.startswith("tvlars.optim"):
            outside = sorted(t for t in targets if not t.startswith("tvlars.optim") and t != "tvlars.errors")
            assert not outside, f"{name} imports {outside}"


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """A package whose two modules import each other, one of them inside a function."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def late():\n    from .. import a\n    return a\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("def late():\n    import json\n    return json\n")
    assert find_cycle(import_graph(package)) is None


def test_the_integrations_stand_apart():
    """tvlars.integrations.* may import other stacks (timm): nothing else in the package may
    import them, or the core would need those stacks; they use the public optimizer API."""
    graph = import_graph(PACKAGE)
    assert "tvlars.integrations.timm" in graph
    for name, targets in graph.items():
        inside = name.startswith("tvlars.integrations")
        if inside:
            assert targets <= {"tvlars", "tvlars.optim"}, f"{name} imports {sorted(targets)}"
        else:
            assert not any(t.startswith("tvlars.integrations") for t in targets), f"{name} imports an integration"
