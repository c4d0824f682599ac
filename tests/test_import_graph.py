"""The import graph of engine/, loaders/, kernels/ and bench/, read from the tree with ast: no cycles between
modules, nothing below bench imports bench, and the data path (loaders/, kernels/) imports nothing from engine/.

Every `import` and `from ... import` counts, at module level or inside a function (a function-level import is a
dependency all the same, only a lazy one). An edge goes to the most specific project module named:
`from engine.models import vit` is an edge to engine.models.vit, `from engine.models import create_model` one to
engine.models (its __init__). The parent packages Python also runs on the way are not edges: a package that
imports its submodules (a registry) is not in a cycle with them unless they import it back.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "loaders", "kernels", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """{dotted name: file} for every .py file under the project packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imported_names(path: Path, name: str) -> list[str]:
    """Every dotted name an import statement anywhere in the file can resolve to (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def _resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `dotted` that is a project module, or None (a third-party or stdlib name)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}, self-edges dropped."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = {_resolve(d, modules) for d in _imported_names(path, name)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; every cycle lies in one."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _edges_into(graph: dict[str, set[str]], sources: tuple[str, ...], target: str) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() if m.split(".")[0] in sources
                  for t in ts if t.split(".")[0] == target)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = sorted(f"{m} -> {t}" for m in component for t in graph[m] if t in members)
    return f"cycle among {component}: " + ", ".join(edges)


def test_the_graph_sees_the_tree():
    """The walker finds what is certainly there: the CLI's imports and a function-level import."""
    graph = import_graph()
    assert {"engine.cli", "loaders.factory", "kernels.dispatch", "bench.__main__"} <= set(graph)
    assert "engine.config" in graph["engine.cli"]
    assert "kernels.triton_runtime" in graph["loaders.transforms.rng"]      # inside a function


def test_cycle_finder_reports_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    for component in found:
        print(_describe(component, graph))
    assert not found, "\n".join(_describe(c, graph) for c in found)


def test_nothing_below_bench_imports_bench():
    edges = _edges_into(import_graph(), ("engine", "loaders", "kernels"), "bench")
    print("\n".join(edges))
    assert not edges, edges


def test_loaders_and_kernels_import_nothing_from_engine():
    edges = _edges_into(import_graph(), ("loaders", "kernels"), "engine")
    print("\n".join(edges))
    assert not edges, edges


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph with every module of a sub-folder (engine/models/, engine/ssl/, loaders/transforms/, ...) merged
    into one node named after the folder; modules directly in a top package stay their own nodes."""
    def node(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and _is_package(module)) else module

    merged: dict[str, set[str]] = {}
    for module, targets in graph.items():
        merged.setdefault(node(module), set()).update(node(t) for t in targets)
    return {m: ts - {m} for m, ts in merged.items()}


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").is_file()


def test_no_import_cycles_between_folders():
    """A loop between two folders (models/ importing ssl/ that imports models/) is one even when no two modules
    import each other."""
    graph = folder_graph(import_graph())
    found = cycles(graph)
    for component in found:
        print(_describe(component, graph))
    assert not found, "\n".join(_describe(c, graph) for c in found)
