"""benchmarks/mutation.py: its CORE table matches the sources and the tests, and each staged run selects what it says.

No mutmut run here (that takes minutes): the table and the staged configuration are checked as data.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import sys

import pytest

from helpers import REPO_ROOT


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_benchmark", REPO_ROOT / "benchmarks" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_table_names_existing_files_functions_and_tests(mutation):
    mutation.check_table()  # exits listing every stale entry otherwise


def test_a_moved_test_file_a_renamed_function_and_a_spawning_test_are_reported(mutation, monkeypatch):
    monkeypatch.setitem(mutation.TEST_FILES, "losses", "tests/unit/no_such_test.py")
    renamed = mutation.Core("src/pirl/losses.py", ("losses",), ("no_such_function",))
    monkeypatch.setitem(mutation.CORE, "losses", renamed)
    first = mutation.DESELECT[0]
    monkeypatch.setattr(mutation, "DESELECT", mutation.DESELECT[1:])
    with pytest.raises(SystemExit) as err:
        mutation.check_table()
    message = str(err.value)
    assert "TEST_FILES['losses']: no file tests/unit/no_such_test.py" in message
    assert "src/pirl/losses.py has no function no_such_function" in message
    assert f"{mutation.TEST_FILES[first[0]]}::{first[1]} spawns a subprocess" in message


def test_a_decorated_function_is_refused_because_mutmut_skips_it(mutation, monkeypatch):
    core = mutation.Core("src/pirl/bank/replicated.py", ("bank",), ("MemoryBank.update",))
    monkeypatch.setitem(mutation.CORE, "bank.replicated", core)
    with pytest.raises(SystemExit, match="MemoryBank.update is decorated"):
        mutation.check_table()


def test_a_staged_run_mutates_its_modules_and_selects_only_their_tests(mutation):
    pyproject = mutation.tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    (group,) = mutation.plan(mutation.select(["bank"]))
    assert group.keys == ["bank.replicated", "bank.scoring", "bank.sharded"] and group.name == "bank"
    staged = mutation.tomllib.loads(
        mutation.staged_pyproject(group, pyproject["tool"]["mutmut"], pyproject["tool"]["pytest"]["ini_options"])
    )
    settings = staged["tool"]["mutmut"]
    assert settings["only_mutate"] == [
        "src/pirl/bank/replicated.py",
        "src/pirl/bank/scoring.py",
        "src/pirl/bank/sharded.py",
    ]
    assert settings["pytest_add_cli_args_test_selection"] == [mutation.TEST_FILES[k] for k in ("bank", "bank_by_hand")]
    assert settings["process_isolation"] == pyproject["tool"]["mutmut"]["process_isolation"]
    assert staged["tool"]["pytest"]["ini_options"] == pyproject["tool"]["pytest"]["ini_options"]


def test_subprocess_tests_are_deselected_in_the_run_of_their_file(mutation):
    (group,) = mutation.plan(mutation.select(["data"]))
    selection = group.selection()
    deselected = {selection[i + 1] for i, arg in enumerate(selection) if arg == "--deselect"}
    expected = {f"{mutation.TEST_FILES[k]}::{name}" for k, name in mutation.DESELECT if k in group.tests}
    assert expected and deselected == expected
    files = [arg for arg in selection if arg != "--deselect" and arg not in deselected]
    assert files == [mutation.TEST_FILES[t] for t in group.tests]


def test_mutant_names_map_to_the_selected_functions_only(mutation):
    (group,) = mutation.plan(mutation.select(["bank"]))
    inside = [
        "pirl.bank.replicated.xǁMemoryBankǁ_write__mutmut_3",
        "pirl.bank.replicated.x_initial_rows__mutmut_12",
        "pirl.bank.scoring.x_dense_scores__mutmut_2",
        "pirl.bank.sharded.xǁShardedMemoryBankǁ__init____mutmut_7",
    ]
    outside = [
        "pirl.bank.replicated.xǁMemoryBankǁ__init____mutmut_1",  # replicated.py is restricted to some functions
        "pirl.bank.sharded.xǁShardedMemoryBankǁfull_memory__mutmut_4",
        "pirl.bank.kinds.x_check__mutmut_1",
    ]
    assert [group.module_of(n) for n in inside] == [
        "bank.replicated",
        "bank.replicated",
        "bank.scoring",
        "bank.sharded",
    ]
    assert [group.module_of(n) for n in outside] == [None, None, None]
    globs = group.globs()  # what `mutmut run` is told to test: the same mutants
    assert all(any(fnmatch.fnmatchcase(n, g) for g in globs) for n in inside)
    assert not any(fnmatch.fnmatchcase(n, g) for n in outside for g in globs)
    (whole,) = mutation.plan(["losses"])
    assert whole.globs() == [] and whole.module_of("pirl.losses.x_npid_nce__mutmut_1") == "losses"
