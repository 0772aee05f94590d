"""Layers point one way. The import graph of the project's packages, from the AST of every file (imports at module
level and inside functions alike), has no cycle and no edge that climbs a layer; stages import neither the engine
nor the build's I/O; schemas import no other package; no private name (a leading "_") is imported across modules.
LAYERS lists the layers bottom up: a package imports only packages of lower layers (README "Architecture").
Imports by name at run time (the stage registry's entry points) are not edges: schemas names no package to import.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.layout import ROOT, project_packages

LAYERS: list[tuple[str, ...]] = [
    ("schemas",),  # columns, uids, the spec, the stage registry (filled through the pairforge.stages entry points)
    ("negatives.text",),  # hard negative captions: rules, checks, scoring (no model loading, no stage)
    ("stages", "dataio"),  # the stages and their helpers | the build's I/O
    ("catalogs", "loaders", "negatives"),  # the DuckDB catalog | shard loaders, exports | counterfactual images
    ("demo",),  # the synthetic demo domain (its render editor is a negatives editor)
    ("reporting", "training"),  # report, card, show, blind-bias report | training, proxy evaluation
    ("flows.engine",),  # the Ray engine
    ("flows",),  # the Prefect flows and the CLI
]
LAYER_OF = {node: i for i, layer in enumerate(LAYERS) for node in layer}


@dataclass
class Graph:
    edges: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (from, to) -> ["module:line", ...]
    private: list[str] = field(default_factory=list)  # "module:line name from module"


def node_of(module: str) -> str | None:
    """The graph node a module belongs to: the longest layer entry that is it or a package above it."""
    best = None
    for node in LAYER_OF:
        if (module == node or module.startswith(node + ".")) and (best is None or len(node) > len(best)):
            best = node
    return best


def module_files(root: Path, packages: list[str]) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, tree: ast.AST):
    """(line, imported module, imported name or None) for every import statement, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                yield node.lineno, target, a.name


def private_attributes(tree: ast.AST, modules: set[str]):
    """(line, module, name) for `mod._name` where `mod` is bound to a project module by an import."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    bound[a.asname] = a.name
                else:
                    bound[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in bound:
            target = ".".join([bound[value.id]] + chain)
            if target in modules:
                yield node.lineno, target, node.attr


def build_graph(root: Path, packages: list[str]) -> Graph:
    files = module_files(root, packages)
    modules = set(files)
    g = Graph()
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        src = node_of(module)
        for line, target, name in imports_of(module, path, tree):
            dst = node_of(target)
            if dst is not None and src is not None and dst != src:
                g.edges.setdefault((src, dst), []).append(f"{module}:{line}")
            if name and name.startswith("_") and not name.startswith("__") and target != module \
                    and (target in modules or node_of(target) is not None):
                g.private.append(f"{module}:{line} imports {name} from {target}")
        for line, target, name in private_attributes(tree, modules):
            if target != module:
                g.private.append(f"{module}:{line} uses {target}.{name}")
    return g


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    succ: dict[str, set[str]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)
        succ.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return out


def upward(edges) -> list[str]:
    """Edges that do not point to a lower layer, with where they are."""
    return [f"{a} -> {b} (layer {LAYER_OF[a]} -> {LAYER_OF[b]}): {', '.join(where[:3])}"
            for (a, b), where in sorted(edges.items()) if LAYER_OF[b] >= LAYER_OF[a]]


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(ROOT, project_packages())


def test_every_package_has_a_layer():
    assert sorted(p for p in project_packages() if p not in LAYER_OF) == []


def test_no_cycle_between_packages(graph):
    found = cycles(graph.edges)
    assert not found, "import cycles between packages: " + "; ".join(
        " <-> ".join(c) + " via " + ", ".join(f"{a}->{b} at {graph.edges[(a, b)][0]}" for a in c for b in c
                                              if (a, b) in graph.edges) for c in found)


def test_layers_point_down(graph):
    assert upward(graph.edges) == []


def test_stages_import_neither_the_engine_nor_io(graph):
    for dst in ("flows", "flows.engine", "dataio"):
        assert ("stages", dst) not in graph.edges, f"stages imports {dst}: {graph.edges.get(('stages', dst))}"


def test_schemas_import_no_other_package(graph):
    assert [(a, b) for a, b in graph.edges if a == "schemas"] == []


def test_no_private_name_crosses_a_module(graph):
    assert graph.private == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """A small tree with each fault planted: the same functions find every one."""
    files = {
        "schemas/__init__.py": "",
        "schemas/spec.py": "def f():\n    from stages import registry  # a lazy import still counts\n",
        "stages/__init__.py": "from schemas.spec import f\n",
        "stages/blur.py": "from dataio.storage import location\nfrom stages import base\nx = base._hidden\n",
        "stages/base.py": "_hidden = 1\n",
        "dataio/__init__.py": "",
        "dataio/storage.py": "from stages.blur import _private_helper\nfrom ..stages import blur\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    g = build_graph(tmp_path, ["schemas", "stages", "dataio"])
    assert ("schemas", "stages") in g.edges and ("stages", "schemas") in g.edges
    assert cycles(g.edges) == [["dataio", "schemas", "stages"]]
    assert any(e.startswith("schemas -> stages") for e in upward(g.edges))
    assert ("stages", "dataio") in g.edges
    assert sorted(g.private) == ["dataio.storage:1 imports _private_helper from stages.blur",
                                 "stages.blur:3 uses stages.base._hidden"]
