"""The layers of docs/architecture.md, checked on the import graph of every module of hsam.

A module may import (at module level, outside ``if TYPE_CHECKING:``) only hsam modules of its own
layer or of the layers its row names, all of which are listed above it; the module-level imports
form no cycle. ``import hsam`` (for ``__version__``) is allowed everywhere: the package's
``__init__`` imports nothing of hsam eagerly, which is checked too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from functools import cache

import hsam

ABOVE = "every layer above"

#: The table of docs/architecture.md: layer -> (its modules, the layers it may import), in order.
#: A module belongs to the layer of its longest matching entry (``hsam.io.checkpoint`` is in
#: "building", the rest of ``hsam.io`` in "files").
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | str]] = {
    "foundations": (("hsam.errors", "hsam.devices", "hsam.intensity", "hsam.config"), ()),
    "model": (("hsam.modeling",), ()),
    "files": (("hsam.io",), ("foundations",)),
    "building": (("hsam.build", "hsam.io.checkpoint"), ("foundations", "model", "files")),
    "data": (("hsam.data",), ("foundations", "files")),
    "inference": (("hsam.inference",), ABOVE),
    "evaluation": (("hsam.evaluation",), ABOVE),
    "training": (("hsam.engine",), ABOVE),
    "applications": (("hsam.apps", "hsam.__main__"), ABOVE),
}
ORDER = list(LAYERS)


def allowed_layers(layer: str) -> set[str]:
    may = LAYERS[layer][1]
    return {layer, *(ORDER[: ORDER.index(layer)] if may == ABOVE else may)}


@cache
def all_modules() -> dict[str, bool]:
    """Every module of hsam -> whether it is a package (walk_packages imports the packages)."""
    found = {"hsam": True}

    def fail(name: str) -> None:
        raise ImportError(f"cannot import {name}")

    for info in pkgutil.walk_packages(hsam.__path__, "hsam.", onerror=fail):
        found[info.name] = info.ispkg
    return found


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, (prefixes, _) in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(module: str, source: str, is_package: bool = False) -> set[str]:
    """The hsam modules `module` imports when it is imported: statements at module level (also
    inside module-level if/try/with blocks and class bodies), not in functions, not under
    ``if TYPE_CHECKING:``. ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    known = all_modules()
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module if is_package else module.rpartition(".")[0]
                    parts = package.split(".")
                    package = ".".join(parts[: len(parts) - (node.level - 1)])
                    base = f"{package}.{base}" if base else package
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            else:
                for field in ("body", "orelse", "finalbody"):
                    block = getattr(node, field, None)
                    if isinstance(block, list):
                        visit(block)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(source).body)
    return {name for name in found if name == "hsam" or name.startswith("hsam.")}


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    layer = layer_of(module)
    if layer is None:
        return [f"{module} is in no layer of the table"]
    allowed = allowed_layers(layer)
    out = []
    for target in sorted(module_level_imports(module, source, is_package)):
        if target == "hsam":
            continue
        target_layer = layer_of(target)
        if target_layer not in allowed:
            out.append(f"{module} ({layer}) imports {target} ({target_layer})")
    return out


def source_of(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    with open(spec.origin, encoding="utf-8") as handle:
        return handle.read()


def test_every_module_imports_and_has_a_layer():
    modules = all_modules()
    assert {"hsam.modeling.hsam", "hsam.io.images.reading", "hsam.apps.cli"} <= set(modules)
    for name in modules:
        if name != "hsam.__main__":  # importing it runs the CLI
            importlib.import_module(name)
    unplaced = [m for m in modules if m != "hsam" and layer_of(m) is None]
    assert not unplaced, f"add these modules to LAYERS (and docs/architecture.md): {unplaced}"


def test_each_layer_imports_only_layers_listed_above_it():
    for layer, (_, may) in LAYERS.items():
        if may != ABOVE:
            assert set(may) <= set(ORDER[: ORDER.index(layer)]), layer


def test_modules_import_only_their_own_and_allowed_layers():
    found = [
        v
        for name, is_package in all_modules().items()
        if name != "hsam"
        for v in violations(name, source_of(name), is_package)
    ]
    assert not found, "\n".join(found)


def test_the_package_init_imports_nothing_of_hsam_eagerly():
    assert module_level_imports("hsam", source_of("hsam"), is_package=True) == set()


def test_module_level_imports_have_no_cycle():
    graph = {
        name: module_level_imports(name, source_of(name), is_package) - {"hsam"}
        for name, is_package in all_modules().items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_check_catches_a_wrong_import():
    assert violations("hsam.modeling.hsam", "from hsam.io.atomic import atomic_output\n")
    assert violations("hsam.modeling.hsam", "import hsam.io\n")
    assert violations("hsam.modeling.lora", "from ..io import atomic\n")  # relative
    assert violations("hsam.io.weights", "from hsam.build import build_hsam\n")
    assert violations("hsam.data.case", "from hsam.inference.predictor import Predictor\n")
    assert violations("hsam.evaluation.scoring", "from hsam.engine import trainer\n")
    assert violations("hsam.newmodule", "") == ["hsam.newmodule is in no layer of the table"]
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hsam.io.atomic\n"
    assert violations("hsam.modeling.hsam", guarded) == []
    lazy = "def f():\n    from hsam.apps import cli\n"
    assert violations("hsam.modeling.hsam", lazy) == []
    assert violations("hsam.io.checkpoint", "from hsam.build import build_hsam\n") == []
    assert violations("hsam.apps.cli", "import hsam\nfrom hsam.engine import trainer\n") == []
