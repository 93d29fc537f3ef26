"""The code's layout: no import circle, no module taking another's private names, no module over
~500 lines unless its docstring names the one job it holds."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("components", "pipeline", "serving", "bench")
MAX_LINES = 550  # "~500": a long module must say which one job it holds
ONE_JOB = "One job"


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every project module."""
    found = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (a module, or a package's member)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: str) -> list[tuple[str, list[str]]]:
    """(project module, names taken from it) for every import in the file, wherever it stands
    (imports inside functions close circles too)."""
    out = []
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name)) is not None:
                    out.append((target, []))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in MODULES:  # `from package import module`
                    out.append((full, []))
                elif (target := _resolve(node.module)) is not None:
                    out.append((target, [alias.name]))
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _ in imports_of(path):
            if target != name:
                graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert len(MODULES) > 50  # the walk really found the project
    assert circles(import_graph()) == []


def test_no_module_imports_another_modules_private_names():
    taken = [
        f"{os.path.relpath(path, ROOT)} takes {name} from {target}"
        for module, path in MODULES.items()
        for target, names in imports_of(path)
        for name in names
        if name.startswith("_") and target != module
    ]
    assert taken == []


def test_long_modules_say_which_one_job_they_hold():
    long = []
    for module, path in sorted(MODULES.items()):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        lines = text.count("\n")
        if lines > MAX_LINES and ONE_JOB not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{module}: {lines} lines")
    assert long == []
