"""Every command-line option of the three scripts is exercised by at least one test.

A test "exercises" an option of a script when one ``test_*`` function (decorators
included, and the module's tables and helpers that it uses) names both the option's
exact string (``"--tta"``) and the script (its module, ``test_mito``, or its file
name in a command line, ``"test_mito.py"``). So a new option cannot
slip in without a test that runs it; whether that test checks the option's effect is
the reviewer's job, and this guard makes sure there is one to review.
"""

import ast

import pytest

from conftest import REPO

import prediction_mito
import test_mito
import training_mito

PARSERS = {
    "training_mito.py": training_mito.build_parser,
    "test_mito.py": test_mito.build_parser,
    "prediction_mito.py": prediction_mito.build_parser,
}
# Options that every argparse parser has; nothing of ours to test.
ARGPARSE_OWN = {"-h", "--help"}


def script_options(build_parser) -> set[str]:
    parser = build_parser()
    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
    return options - ARGPARSE_OWN


def strings_in(node) -> set[str]:
    return {leaf.value for leaf in ast.walk(node) if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str)}


def identifiers_in(node) -> set[str]:
    return {leaf.id for leaf in ast.walk(node) if isinstance(leaf, ast.Name)}


def names_in_tests() -> dict[str, set[str]]:
    """{test function: the strings and identifiers it names}, across tests/ but this module.

    What a module-level table (``CASES = {...}``) or helper function that the test uses
    names counts as named by the test too.
    """
    found = {}
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name == "test_option_coverage.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        own = {}  # module-level name -> (its strings, the identifiers it uses)
        for statement in tree.body:
            if isinstance(statement, ast.Assign):
                for target in statement.targets:
                    if isinstance(target, ast.Name):
                        own[target.id] = (strings_in(statement.value), identifiers_in(statement.value))
            elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                own[statement.name] = (strings_in(statement), identifiers_in(statement))
        for name, (strings, identifiers) in own.items():
            if name.startswith("test_"):
                seen, pending = {name}, set(identifiers)
                names = strings | identifiers
                while pending:
                    used = pending.pop()
                    if used in own and used not in seen:
                        seen.add(used)
                        names |= own[used][0] | own[used][1]
                        pending |= own[used][1]
                found[f"{path.name}::{name}"] = names
    return found


def names_script(names: set[str], script: str) -> bool:
    """Whether a test names the script: as a module, or inside a string (a command line, code run in a subprocess)."""
    module = script.removesuffix(".py")
    return module in names or any(module in name for name in names if " " in name or name.endswith(".py"))


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_option_is_named_by_a_test(script):
    tests = [names for names in names_in_tests().values() if names_script(names, script)]
    untested = sorted(option for option in script_options(PARSERS[script])
                      if not any(option in names for names in tests))
    assert not untested, f"{script}: no test names these options: {untested}"


def test_the_guard_sees_options_and_tests():
    # The guard itself must not pass vacuously.
    assert {"--tta", "--preset", "--instances"} <= set().union(*(script_options(build) for build in PARSERS.values()))
    tests = names_in_tests()
    assert len(tests) > 100
    assert any("--tta" in names and names_script(names, "prediction_mito.py") for names in tests.values())
    assert not any("--frobnicate" in names for names in tests.values())
