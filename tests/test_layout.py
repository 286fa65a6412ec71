"""The code stays a house a newcomer can find their way in: one concern per module, short functions,
a shallow import graph, no module importing a script.

The limits are the redesign's: no product module above 500 lines, no function above 80, at most
5 floors from a module that imports nothing of ours to the scripts and benchmarks on top (lazy
imports inside functions count), and the scripts are imported by nothing.
"""

import ast
from functools import cache

import pytest

from conftest import REPO

SCRIPTS = ("training_mito", "test_mito", "prediction_mito")
PRODUCT = sorted([REPO / "unet.py", REPO / "data.py", *(REPO / "mito").glob("*.py")])
EVERYTHING = sorted([*PRODUCT, *(REPO / f"{name}.py" for name in SCRIPTS), *(REPO / "benchmarks").glob("*.py"),
                     *(REPO / "misc").glob("*.py")])
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_FLOORS = 500, 80, 5


def module_name(path):
    relative = path.relative_to(REPO).with_suffix("")
    return ".".join(relative.parts)


def project_imports(path) -> set[str]:
    """The project modules that ``path`` imports anywhere in it (top level or inside functions)."""
    known = {module_name(other) for other in EVERYTHING}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found - {module_name(path)}


GRAPH = {module_name(path): project_imports(path) for path in EVERYTHING}


@cache
def floor(module: str) -> int:
    """1 for a module that imports nothing of ours, else one more than the highest module it imports."""
    return 1 + max((floor(imported) for imported in GRAPH[module]), default=0)


@pytest.mark.parametrize("path", PRODUCT, ids=module_name)
def test_no_product_module_is_a_warehouse(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


@pytest.mark.parametrize("path", EVERYTHING, ids=module_name)
def test_no_function_needs_a_scroll_bar(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


def test_the_import_graph_is_at_most_five_floors_and_no_module_imports_a_script():
    tallest = max(GRAPH, key=floor)
    assert floor(tallest) <= MAX_FLOORS, {module: floor(module) for module in sorted(GRAPH, key=floor)}
    importers = {module: imported & set(SCRIPTS) for module, imported in GRAPH.items() if imported & set(SCRIPTS)}
    assert not importers


def test_the_graph_is_read_from_the_code():
    # The checks above must not pass vacuously.
    assert "mito.segmenter" in GRAPH["prediction_mito"] | GRAPH["test_mito"]
    assert floor("mito.errors") == 1 and floor("training_mito") >= 4
