"""No import circle in dinov2/: the module graph (every ``import dinov2...`` statement, also those
inside functions, plus the parent packages an import loads) has no cycle."""

import ast
from pathlib import Path


def _modules(package_root: Path) -> dict[str, Path]:
    mods = {}
    for path in package_root.rglob("*.py"):
        name = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _ancestors(name: str) -> set[str]:
    """Packages imported before ``name`` ("dinov2.a.b.c" -> "dinov2.a", "dinov2.a.b"), root excluded."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


def import_graph(package_root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name imported from a package counts as its
    submodule when one of that name exists)."""
    mods = _modules(package_root)

    def known(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("dinov2")
            ):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in mods else known(node.module))
            elif isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names if a.name.startswith("dinov2")}
        # importing a.b.c first imports a.b: an edge, unless the importer already sits inside a.b
        deps |= {a for d in deps for a in _ancestors(d) if a in mods} - _ancestors(module)
        graph[module] = deps - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"} - {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_lazy_imports_and_parent_packages(tmp_path):
    pkg = tmp_path / "dinov2"
    (pkg / "p").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "p" / "__init__.py").write_text("from dinov2.p.x import f\n")
    (pkg / "p" / "x.py").write_text("def f():\n    from dinov2.y import g\n")
    (pkg / "y.py").write_text("import dinov2.p.x\n")
    graph = import_graph(pkg)
    assert graph["dinov2.p.x"] == {"dinov2.y"}
    assert graph["dinov2.y"] == {"dinov2.p.x", "dinov2.p"}
    # p -> p.x (its __init__), p.x -> y (lazily), y -> p.x and, first, its package p
    assert cycles(graph) == [["dinov2.p", "dinov2.p.x", "dinov2.y"]]


def test_dinov2_has_no_import_cycle(repo_root):
    graph = import_graph(repo_root / "dinov2")
    assert len(graph) > 50  # the walk found the package
    assert cycles(graph) == []
