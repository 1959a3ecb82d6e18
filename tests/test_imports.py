"""The package has no import cycle, counting imports inside functions as well as at the top."""

import ast
from pathlib import Path

import slm_lightning

PACKAGE = Path(slm_lightning.__file__).parent


def module_names(package: Path) -> dict[str, Path]:
    """``slm_lightning.callbacks.metrics`` → its file, for every module of the package."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module's imports of other modules of the package, wherever in the file they are
    (``ast.walk`` visits function bodies); ``from a.b import c`` counts ``a.b.c`` if that is a
    module, else ``a.b``. A module importing its own parent package is not an edge."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, …, a]``, or None (depth-first search, colouring)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_through_a_function_level_import(tmp_path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (package / "a.py").write_text("from pkg.sub import B\n")
    (package / "sub" / "b.py").write_text("class B:\n    def f(self):\n        from ..a import x\n")
    (package / "c.py").write_text("import pkg.a\n")  # on no cycle
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.a"}  # relative, inside a function
    assert graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("class B:\n    pass\n")
    assert find_cycle(import_graph(package)) is None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert {"slm_lightning.cli", "slm_lightning.errors", "slm_lightning.algorithms.ppo"} <= set(
        graph
    )
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_errors_imports_nothing_of_the_package() -> None:
    # Every module raises ConfigError, so errors.py importing any of them would make a cycle
    # as soon as that module is imported first.
    assert import_graph(PACKAGE)["slm_lightning.errors"] == set()
