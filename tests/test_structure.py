"""The package's shape: no import cycle (function-level imports included), every kernel ranked."""
import ast
import dataclasses
import graphlib
import importlib.util
import os

import zen_inductor
from zen_inductor.kernels import KERNELS, Kernel


def _modules() -> dict:
    """module name -> source file, for zen_inductor and its patterns (installed from a folder of
    their own as zen_inductor.patterns)."""
    roots = {"zen_inductor": os.path.dirname(zen_inductor.__file__),
             "zen_inductor.patterns": importlib.util.find_spec("zen_inductor.patterns").submodule_search_locations[0]}
    modules = {}
    for package, root in roots.items():
        for folder, _, names in os.walk(root):
            for name in names:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join([package, *parts])] = os.path.join(folder, name)
    return modules


def _imports(module: str, path: str, modules: dict) -> set:
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else node.module
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
    return {name for name in found if name in modules and name != module}


def test_the_package_imports_without_a_cycle():
    modules = _modules()
    assert "zen_inductor.kernels.registry" in modules and "zen_inductor.patterns.dequant_matmul" in modules
    graph = {module: _imports(module, path, modules) for module, path in modules.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert "zen_inductor.autotune" not in set().union(*(graph[m] for m in modules if m.startswith("zen_inductor.kernels")))


def test_every_kernel_has_a_static_rank():
    """With autotuning off, or in bins the budget did not reach, kernels are chosen by rank: one
    left at the default would be tried last (the AVX-512 GEMVs were, before ranks were theirs)."""
    default = next(f.default for f in dataclasses.fields(Kernel) if f.name == "rank")
    unranked = [name for name, kernel in KERNELS.items() if kernel.rank == default]
    assert not unranked


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def test_modules_and_functions_stay_short_enough_to_read():
    """A newcomer reads a module top to bottom and a function at a glance: the bounds of the
    house issue (#24), held for every module of the package and its patterns."""
    too_long = []
    for module, path in _modules().items():
        source = open(path).read()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= MAX_FUNCTION_LINES:
                too_long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
