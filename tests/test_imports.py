"""The project's import graph, read from every file's syntax tree (imports inside functions
included): no cycle anywhere, and the model module imports no other project file."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "multimnist_capsnet"


def project_files() -> dict[str, Path]:
    """Module name -> file, for every .py file of the project (the root, bench/ and tests/)."""
    files = [*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    return {f.stem: f for f in files}


def imported_names(path: Path) -> set[str]:
    """The top-level module names that path imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])  # importlib.import_module("name")
    return names


def graph(files: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imported_names(path) & set(files) - {name} for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_model_module_imports_no_project_file():
    files = project_files()
    assert MODEL in files
    assert graph(files)[MODEL] == set(), "the model module must import none of its siblings"


def test_no_import_cycle_in_the_project():
    cycle = find_cycle(graph(project_files()))
    assert cycle is None, " -> ".join(cycle)


def test_every_sibling_builds_on_the_model_module():
    edges = graph(project_files())
    for name in ("mnist_fetch", "cnn_baseline", "capsnet_predict", "capsnet_serve", "mpi_train",
                 "affnist_like", "visualize_multimnist_capsnet", "make_multimnist_capsnet_gif"):
        assert MODEL in edges[name], name


@pytest.mark.parametrize("source, cycle", [
    ("import b\n", ["a", "b", "a"]),                             # at the top
    ("def f():\n    import b\n", ["a", "b", "a"]),               # inside a function
    ("def f():\n    from b import x\n", ["a", "b", "a"]),
    ("import importlib\nimportlib.import_module('b')\n", ["a", "b", "a"]),
    ("import os\n", None),
])
def test_the_checker_finds_a_cycle_wherever_the_import_is(tmp_path, source, cycle):
    """The test above cannot pass by reading too little: a planted cycle is found."""
    (tmp_path / "a.py").write_text(source)
    (tmp_path / "b.py").write_text("import a\n")
    files = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert find_cycle(graph(files)) == cycle
