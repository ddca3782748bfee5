"""The package's layers, read from the source (ast: nothing is imported). A module imports only
from its own layer or lower ones, every module belongs to a layer, no two modules of different
layers share a name, and no modules import each other at import time (docs/architecture.md)."""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# A module belongs to the longest entry that is it or one of its packages; bare "qtool" (the
# package's __init__.py) only to itself, so a new top-level module must be added here.
LAYERS = {
    "qtool.core": 0,  # ground: errors, paths, spec, checkpoint, data, quantizer, devices, progress
    "qtool.models": 1,
    "qtool.quant": 2,
    "qtool.metrics": 2,
    "qtool.kernels": 3,
    "qtool.runtime": 4,
    "qtool.stages": 5,
    "qtool.cli": 6,  # face
    "qtool.recipe": 6,
    "qtool.bench": 6,
    "qtool": 6,
}

# Packages of one layer that must not import each other either. Quantization maths and metrics
# share layer 2 and neither uses the other: metrics measure any model (float, fake-quantized,
# packed) without knowing how it was quantized, and the eval stage is where the two meet.
INDEPENDENT = [("qtool.quant", "qtool.metrics")]


@dataclass(frozen=True)
class Import:
    target: str  # the qtool module imported (a submodule where `from X import name` names one)
    line: int
    lazy: bool  # inside a function, or under `if TYPE_CHECKING:`: not run when the module is imported


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "qtool").rglob("*.py"))}


def layer_of(module: str) -> int | None:
    if module == "qtool":
        return LAYERS["qtool"]
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def _is_qtool(name: str) -> bool:
    return name == "qtool" or name.startswith("qtool.")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every qtool import in `source` (the text of `module`): absolute and relative, at module
    level and lazy. `from X import name` counts as importing X.name when that is a module."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def base_of(node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        parts = package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, lazy) for a in node.names if _is_qtool(a.name))
        elif isinstance(node, ast.ImportFrom):
            base = base_of(node)
            if _is_qtool(base):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.append(Import(sub if sub in known else base, node.lineno, lazy))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(ast.parse(source), False)
    return found


def all_imports() -> dict[str, list[Import]]:
    modules = source_modules()
    known = set(modules)
    return {
        name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def _fail_on(problems: list[str], title: str) -> None:
    if problems:
        pytest.fail(f"{title} ({len(problems)}):\n" + "\n".join(problems), pytrace=False)


def _where(module: str, line: int) -> str:
    return f"{source_modules()[module].relative_to(SRC.parent)}:{line}"


def _in_package(module: str, package: str) -> bool:
    """`module` is `package` or inside it, and of the package's own layer."""
    return (module == package or module.startswith(package + ".")) and layer_of(module) == layer_of(package)


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in source_modules() if layer_of(m) is None]
    _fail_on(unknown, "modules in no layer (add them to LAYERS in tests/test_layers.py)")


def test_every_layer_entry_names_a_module():
    modules = source_modules()
    stale = [name for name in LAYERS if name not in modules]
    _fail_on(stale, "LAYERS names modules that do not exist")


def test_imports_only_go_down():
    modules = source_modules()
    problems = []
    for module, imports in all_imports().items():
        here = layer_of(module)
        for imp in imports:
            there = layer_of(imp.target)
            if there is None or imp.target not in modules:
                problems.append(
                    f"{module} imports {imp.target}, which is no qtool module  [{_where(module, imp.line)}]"
                )
            elif here is not None and there > here:  # a module in no layer fails the test above
                problems.append(
                    f"{module} (layer {here}) imports {imp.target} (layer {there})  [{_where(module, imp.line)}]"
                )
    _fail_on(problems, "imports that go up a layer or to no qtool module")


def test_independent_packages_do_not_import_each_other():
    problems = []
    for module, imports in all_imports().items():
        for a, b in INDEPENDENT:
            for here, other in ((a, b), (b, a)):
                if _in_package(module, here):
                    problems += [
                        f"{module} (layer {layer_of(module)}) imports {imp.target} (layer {layer_of(imp.target)}):"
                        f" {here} and {other} are independent  [{_where(module, imp.line)}]"
                        for imp in imports
                        if _in_package(imp.target, other)
                    ]
    _fail_on(problems, "imports between independent packages")


def test_no_two_modules_of_different_layers_share_a_name():
    """stages/pack.py beside a runtime/pack.py would make `pack` mean two things; a module may share
    its name with one of its own packages (metrics/zeroshot/metrics.py in qtool.metrics)."""
    by_name = defaultdict(list)
    for module in source_modules():
        if module != "qtool":
            by_name[module.rpartition(".")[2]].append(module)
    problems = []
    for name, modules in sorted(by_name.items()):
        for i, a in enumerate(modules):
            for b in modules[i + 1 :]:
                if layer_of(a) == layer_of(b) or a.startswith(b + ".") or b.startswith(a + "."):
                    continue
                problems.append(f"{a} (layer {layer_of(a)}) and {b} (layer {layer_of(b)}) are both named {name!r}")
    _fail_on(problems, "modules of different layers with one name")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:  # the shortest way back to the component's first module
        start = min(component)
        parent, queue = {start: None}, deque([start])
        while queue:
            v = queue.popleft()
            nxt = sorted(graph[v] & component)
            if start in nxt:
                chain = [v]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                cycles.append(chain[::-1] + [start])
                break
            for w in nxt:
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
    return cycles


def test_no_import_cycles_at_module_level():
    modules = set(source_modules())
    graph = {m: set() for m in modules}
    for module, imports in all_imports().items():
        graph[module] |= {i.target for i in imports if not i.lazy and i.target in modules and i.target != module}
    cycles = _cycles(graph)
    _fail_on([" -> ".join(c) for c in cycles], "import cycles at module level")


def test_collector_sees_every_import_form():
    source = """
import os
import qtool.core.errors
from qtool.models import adapters
from qtool.core.spec import QuantSpec
from . import sibling
from .. import models
from ..core.paths import bundled_dir
if TYPE_CHECKING:
    from qtool.runtime.decoder import Decoder

def f():
    from qtool.stages.pack import pack

class C:
    import qtool.kernels
"""
    known = {"qtool.core.errors", "qtool.models.adapters", "qtool.quant.sibling", "qtool.models", "qtool.core.paths"}
    got = [(i.target, i.lazy) for i in imports_of(source, "qtool.quant.x", False, known)]
    assert got == [
        ("qtool.core.errors", False),
        ("qtool.models.adapters", False),
        ("qtool.core.spec", False),
        ("qtool.quant.sibling", False),
        ("qtool.models", False),
        ("qtool.core.paths", False),
        ("qtool.runtime.decoder", True),
        ("qtool.stages.pack", True),
        ("qtool.kernels", False),
    ]
    # relative imports in a package's __init__ start from the package itself
    assert [i.target for i in imports_of("from .core import x", "qtool", True, set())] == ["qtool.core"]


def test_cycle_finder():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
