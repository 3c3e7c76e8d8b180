"""Mutation testing of the core with mutmut: which small changes to the core code do its own tests notice?

The CORE table below names the core modules, the test files that exercise each, and (for big files) the functions
to mutate. Modules that share their test files form one group, and each group is one ``mutmut run`` staged in
``mutants/<group>/``: there mutmut mutates only that group's files and runs only those test files (minus
:data:`DESELECT`), with ``--max-children`` workers. Each mutant is tested by the selected tests that call the
mutated function. The settings common to every run are ``[tool.mutmut]`` in pyproject.toml.

The last line printed is JSON: ``{"mutants": N, "killed": K, "timeout": T, "no_tests": X, "survived": [names],
...}``, with the counts of each module under ``by_module``. The diff of every survivor (``mutmut show NAME``) is
written to ``mutants/survivors.md``. docs/mutation.md explains how to read the output.

    python benchmarks/mutation.py                       # every core module, 2 workers, at most --budget seconds
    python benchmarks/mutation.py --modules losses      # a subset: module keys, or a prefix (--modules bank)
    python benchmarks/mutation.py --dry-run             # the plan and the number of mutants, running no test
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mutmut depends on toml there
    import toml as tomllib

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "mutants"

# The one place that names test files: update these paths when the tests move.
TEST_FILES = {
    "losses": "tests/unit/methods/test_losses.py",
    "loss_terms": "tests/unit/methods/test_loss_terms_by_hand.py",
    "bank": "tests/unit/bank/test_bank.py",
    "bank_by_hand": "tests/unit/bank/test_bank_by_hand.py",
    "methods": "tests/unit/methods/test_methods.py",
    "model": "tests/unit/models/test_model.py",
    "training_step": "tests/unit/training/test_training_step.py",
    "views": "tests/unit/data/test_views.py",
    "augment": "tests/unit/data/test_augment.py",
    "batched": "tests/unit/data/test_batched.py",
    "view_geometry": "tests/unit/data/test_view_geometry.py",
    "train_resume_export": "tests/integration/test_train_resume_export.py",
    "api_weights": "tests/integration/test_api_weights.py",
    "export_exact": "tests/integration/test_export_exact.py",
    "export_refusals": "tests/unit/test_export_refusals.py",
}

# Tests left out of every run: each spawns a Python subprocess, which imports the unmutated package (mutmut puts
# the mutated copy on the sys.path of its own processes only), so it cannot kill a mutant and only costs time.
DESELECT = (
    ("augment", "test_the_table_module_does_not_import_torch"),
    ("augment", "test_the_views_and_the_evaluators_keep_to_their_layers"),
    ("api_weights", "test_public_names_resolve_and_import_is_lazy"),
)


@dataclass(frozen=True)
class Core:
    """A core module: the file to mutate, the keys of its test files, the functions to mutate (empty: all).

    A function is ``name`` or ``Class.method``. mutmut mutates only the bodies of functions and methods, and never a
    function with a decorator other than ``@staticmethod`` / ``@classmethod`` (``--dry-run`` lists those).
    """

    source: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()


METHOD_TESTS = ("loss_terms", "methods", "model", "training_step")
DATA_TESTS = ("views", "view_geometry", "augment", "batched")
EXPORT_TESTS = ("export_exact", "export_refusals", "train_resume_export", "api_weights")
SHARD = "ShardedMemoryBank."

CORE: dict[str, Core] = {
    "losses": Core("src/pirl/losses.py", ("losses", "loss_terms")),
    # the bank's update (the EMA write) and sampling (initial rows, negatives), and the choice of scoring path
    "bank.replicated": Core(
        "src/pirl/bank/replicated.py",
        ("bank", "bank_by_hand"),
        ("initial_rows", "MemoryBank.sample_negatives", "MemoryBank.score", "MemoryBank._write"),
    ),
    "bank.scoring": Core("src/pirl/bank/scoring.py", ("bank", "bank_by_hand")),
    # all but score and full_memory, whose bodies beyond one process are collectives that only torchrun reaches
    "bank.sharded": Core(
        "src/pirl/bank/sharded.py",
        ("bank", "bank_by_hand"),
        tuple(
            SHARD + name for name in ("__init__", "_initial_memory", "owner", "plan", "answer", "unsort", "write_owned")
        )
        + (SHARD + "_load_from_state_dict",),
    ),
    "methods.base": Core("src/pirl/methods/base.py", METHOD_TESTS),
    "methods.pirl": Core("src/pirl/methods/pirl.py", METHOD_TESTS),
    "methods.jigsaw": Core("src/pirl/methods/jigsaw.py", METHOD_TESTS),
    "methods.rotation": Core("src/pirl/methods/rotation.py", METHOD_TESTS),
    "methods.supervised": Core("src/pirl/methods/supervised.py", METHOD_TESTS),
    # the geometry of the per-sample views: the crops, the jigsaw cut and the order of the patches (the colour
    # operations are torchvision's, checked against it in the augmentation tests)
    "data.views": Core(
        "src/pirl/data/views.py",
        DATA_TESTS,
        (
            "ImageView.__init__",
            "ImageView.__call__",
            "jigsaw_geometry",
            "JigsawView.__init__",
            "JigsawView.__call__",
            "PirlViews.__init__",
            "PirlViews.__call__",
            "eval_transform",
        ),
    ),
    "data.augment": Core("src/pirl/data/augment.py", DATA_TESTS),
    # the geometry only: the draws, crop boxes, turns, the crop-resize and the jigsaw cut
    "data.batched": Core(
        "src/pirl/data/batched.py",
        DATA_TESTS,
        (
            "_Draws.uniform",
            "_Draws.between",
            "_Draws.integers",
            "_Draws.bernoulli",
            "_resized_crop_boxes",
            "_unrotate_boxes",
            "_rot90_each",
            "_crop_resize",
            "BatchedViews._crop",
            "BatchedViews._jigsaw",
        ),
    ),
    # the export: torchvision (safetensors + config.json) and timm layouts, re-export, loading an export back
    "export.checkpoint": Core(
        "src/pirl/checkpoint.py",
        EXPORT_TESTS,
        ("trunk_state_dict", "export", "_write_export", "safetensors_bytes", "load_export", "_export_problem"),
    ),
}

# mutmut's exit-code verdicts as ``mutmut results`` names them, and the JSON field each is counted in
FIELDS = {
    "killed": "killed",
    "survived": "survived",
    "timeout": "timeout",
    "no tests": "no_tests",
    "suspicious": "suspicious",
    "segfault": "segfault",
    "not checked": "not_checked",
    "skipped": "skipped",
    "caught by type check": "type_check",
    "check was interrupted by user": "interrupted",
}
MUTMUT = ["-c", "from mutmut.__main__ import cli; cli()"]  # mutmut's console script, run by this interpreter


def module_name(source: str) -> str:
    """``src/pirl/data/views.py`` -> ``pirl.data.views``, the prefix of mutmut's mutant names."""
    return str(Path(source).with_suffix("")).removeprefix("src/").replace("/", ".").replace(".__init__", "")


def mangled(function: str) -> str:
    """mutmut's name of a function (``x_name``) or method (``xǁClassǁmethod``) within its module."""
    cls, _, name = function.rpartition(".")
    return f"xǁ{cls}ǁ{name}" if cls else f"x_{name}"


def functions_of(source: Path) -> dict[str, bool]:
    """Top-level functions and methods of top-level classes -> whether mutmut mutates them (not decorated, or
    only by @staticmethod / @classmethod)."""
    found = {}

    def add(node: ast.AST, prefix: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            decorators = node.decorator_list
            plain = not decorators or (
                len(decorators) == 1
                and isinstance(decorators[0], ast.Name)
                and decorators[0].id in ("staticmethod", "classmethod")
            )
            found[prefix + node.name] = plain

    for node in ast.parse(source.read_text()).body:
        add(node, "")
        if isinstance(node, ast.ClassDef):
            for child in node.body:
                add(child, node.name + ".")
    return found


SPAWNS = re.compile(r"\bsubprocess\b|sys\.executable|torch\.distributed\.run|\bmp\.spawn|multiprocessing")


def test_functions(path: Path) -> dict[str, bool]:
    """The test functions of a file -> whether their code starts a Python subprocess (as far as a look at the
    source tells: a helper that spawns one is not seen)."""
    text = path.read_text()
    return {
        node.name: bool(SPAWNS.search(ast.get_source_segment(text, node) or ""))
        for node in ast.parse(text).body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
    }


@dataclass
class Group:
    """Modules that share their test files: one mutmut run."""

    keys: list[str]
    tests: tuple[str, ...]
    name: str = ""
    statuses: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: bool = False

    def selection(self) -> list[str]:
        """pytest arguments that select the tests: the files, minus the deselected tests."""
        paths = [TEST_FILES[t] for t in self.tests]
        drop = [f"{TEST_FILES[t]}::{name}" for t, name in DESELECT if t in self.tests]
        return paths + [arg for nodeid in drop for arg in ("--deselect", nodeid)]

    def globs(self) -> list[str]:
        """Mutant-name patterns for ``mutmut run`` when a module is restricted to some functions; none otherwise."""
        if not any(CORE[k].functions for k in self.keys):
            return []
        patterns = []
        for key in self.keys:
            core, module = CORE[key], module_name(CORE[key].source)
            if core.functions:
                patterns += [f"{module}.{mangled(f)}__mutmut_*" for f in core.functions]
            else:
                patterns.append(f"{module}.*")
        return patterns

    def module_of(self, mutant: str) -> str | None:
        """The CORE key a mutant belongs to, None for a mutant outside the selected functions."""
        for key in self.keys:
            core, module = CORE[key], module_name(CORE[key].source)
            if not mutant.startswith(module + "."):
                continue
            function = mutant[len(module) + 1 :].partition("__mutmut_")[0]
            if not core.functions or function in {mangled(f) for f in core.functions}:
                return key
        return None


def check_table() -> None:
    """Fail early when the table names a file, test or function that is not there (after a move or a rename)."""
    problems = []
    for key, core in CORE.items():
        source = ROOT / core.source
        if not source.is_file():
            problems.append(f"{key}: no file {core.source}")
            continue
        known = functions_of(source)
        for f in core.functions:
            if f not in known:
                problems.append(f"{key}: {core.source} has no function {f}")
            elif not known[f]:
                problems.append(f"{key}: {f} is decorated, so mutmut does not mutate it; take it out of the table")
        problems += [f"{key}: no test file key {t!r} in TEST_FILES" for t in core.tests if t not in TEST_FILES]
    for name, path in TEST_FILES.items():
        if not (ROOT / path).is_file():
            problems.append(f"TEST_FILES[{name!r}]: no file {path}")
    used = {t for core in CORE.values() for t in core.tests}
    for t in sorted(used & set(TEST_FILES)):
        path = ROOT / TEST_FILES[t]
        if not path.is_file():
            continue
        tests = test_functions(path)
        left_out = {name for key, name in DESELECT if key == t}
        problems += [f"DESELECT: {TEST_FILES[t]} has no test {name}" for name in sorted(left_out - set(tests))]
        problems += [
            f"{TEST_FILES[t]}::{name} spawns a subprocess; add it to DESELECT"
            for name, spawns in tests.items()
            if spawns and name not in left_out
        ]
    if problems:
        sys.exit("benchmarks/mutation.py: the CORE table is out of date:\n  " + "\n  ".join(problems))


def select(wanted: list[str] | None) -> list[str]:
    if not wanted:
        return list(CORE)
    keys = []
    for w in wanted:
        match = [k for k in CORE if k == w or k.startswith(w + ".")]
        if not match:
            sys.exit(f"unknown module {w!r}; choose from {', '.join(CORE)} (or a prefix such as 'bank')")
        keys += [k for k in match if k not in keys]
    return keys


def plan(keys: list[str]) -> list[Group]:
    groups: dict[tuple[str, ...], Group] = {}
    for key in keys:
        tests = CORE[key].tests
        groups.setdefault(tests, Group([], tests)).keys.append(key)
    for group in groups.values():  # the staging folder: the key, or the package the keys share ("bank")
        packages = {k.split(".")[0] for k in group.keys}
        group.name = (
            group.keys[0] if len(group.keys) == 1 else packages.pop() if len(packages) == 1 else "+".join(group.keys)
        )
    return list(groups.values())


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to the staged pyproject.toml")


def staged_pyproject(group: Group, settings: dict, pytest_options: dict) -> str:
    """pyproject.toml of a group's run: the repository's pytest options and [tool.mutmut], plus the group's files."""
    mutmut = {
        **settings,
        "only_mutate": [CORE[k].source for k in group.keys],
        "pytest_add_cli_args_test_selection": group.selection(),
    }
    lines = ["# written by benchmarks/mutation.py for one mutmut run", "[tool.pytest.ini_options]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in pytest_options.items()]
    lines += ["", "[tool.mutmut]"] + [f"{k} = {toml_value(v)}" for k, v in mutmut.items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # the writer above handles only flat tables of plain values
    return text


def child_env() -> dict[str, str]:
    """The environment of mutmut: no PYTHONPATH (mutmut puts the mutated copy first on the path itself) and no
    dataset, so that no test of the run reads one."""
    drop = ("PYTHONPATH", "PIRL_TEST_CIFAR", "MUTANT_UNDER_TEST")
    return {k: v for k, v in os.environ.items() if k not in drop}


def stage(group: Group, pyproject: dict) -> Path:
    """A fresh ``mutants/<group>/``: links to the sources, the tests and the extra files they read, and the group's
    pyproject.toml. mutmut copies them into its own ``mutants/`` there and mutates that copy."""
    settings = pyproject["tool"]["mutmut"]
    where = STAGE / group.name
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    links = {"src", "tests", *(Path(p).parts[0] for p in settings.get("also_copy", []))}
    for name in sorted(links):
        (where / name).symlink_to(ROOT / name, target_is_directory=(ROOT / name).is_dir())
    pytest_options = pyproject["tool"]["pytest"]["ini_options"]
    (where / "pyproject.toml").write_text(staged_pyproject(group, settings, pytest_options))
    return where


def stop(proc: subprocess.Popen) -> None:
    """Interrupt mutmut as Ctrl-C would (it stops its workers and keeps the verdicts so far), then make sure nothing
    of its process group outlives it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this script started (start_new_session)
    except ProcessLookupError:
        pass
    proc.wait()


def run_group(group: Group, where: Path, max_children: int, deadline: float) -> None:
    cmd = [sys.executable, *MUTMUT, "run", "--max-children", str(max_children), *group.globs()]
    start = time.monotonic()
    with open(where / "mutmut.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=where, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True
        )
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            group.stopped = True
        except KeyboardInterrupt:
            group.stopped = True
            stop(proc)
            raise
        stop(proc)
    group.seconds = time.monotonic() - start
    if proc.returncode not in (0, -signal.SIGINT) and not group.stopped:
        tail = (where / "mutmut.log").read_text(errors="replace")[-3000:]
        sys.exit(f"mutmut failed for {group.name} (exit {proc.returncode}); end of {where / 'mutmut.log'}:\n{tail}")


def read_statuses(group: Group, where: Path) -> None:
    """The verdict of each mutant of the group's selection, from ``mutmut results --all true``."""
    out = subprocess.run(
        [sys.executable, *MUTMUT, "results", "--all", "true"],
        cwd=where,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name and group.module_of(name):
            group.statuses[name] = status


SHOW = """
import sys
from mutmut.__main__ import cli
for name in sys.argv[1:]:
    print("@@@mutant", name, flush=True)
    try:
        cli(["show", name], standalone_mode=False)
    except BaseException as err:
        print("(mutmut show failed:", repr(err), ")")
"""


def diffs(names: list[str], where: Path) -> dict[str, str]:
    """``mutmut show NAME`` of each mutant, in one process."""
    if not names:
        return {}
    out = subprocess.run(
        [sys.executable, "-c", SHOW, *names], cwd=where, env=child_env(), capture_output=True, text=True
    ).stdout
    shown, current = {}, None
    for line in out.splitlines():
        if line.startswith("@@@mutant "):
            current = line.split(" ", 1)[1]
            shown[current] = []
        elif current is not None and not line.startswith(f"# {current}: "):
            shown[current].append(line)
    return {name: "\n".join(lines).strip() for name, lines in shown.items()}


def survivors_report(groups: list[Group], path: Path, echo: bool) -> None:
    """Markdown with the diff of every survivor (and of every mutant no selected test reaches), module by module."""
    parts = ["# Surviving mutants", "", "Written by `benchmarks/mutation.py`; see docs/mutation.md.", ""]
    for group in groups:
        where = STAGE / group.name
        for key in group.keys:
            names = {
                s: sorted(n for n, v in group.statuses.items() if v == s and group.module_of(n) == key)
                for s in ("survived", "no tests")
            }
            shown = diffs(names["survived"] + names["no tests"], where)
            tests = ", ".join(TEST_FILES[t] for t in CORE[key].tests)
            parts += [f"## {key} ({CORE[key].source}; tests: {tests})", ""]
            parts += [f"{len(names['survived'])} survived, {len(names['no tests'])} reached by no selected test.", ""]
            for status, title in (("survived", "survived"), ("no tests", "no test reaches it")):
                for name in names[status]:
                    parts += [f"### {name} ({title})", "", "```diff", shown.get(name, ""), "```", ""]
                    if echo:
                        print(f"--- {name} ({title})\n{shown.get(name, '')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def counts(statuses: list[str]) -> dict[str, int]:
    c = Counter(FIELDS.get(s, s.replace(" ", "_")) for s in statuses)
    return {
        "mutants": len(statuses),
        **{f: c[f] for f in ("killed", "timeout", "survived", "no_tests")},
        **{f: c[f] for f in sorted(c) if f not in ("killed", "timeout", "survived", "no_tests")},
    }


def dry_run(groups: list[Group]) -> None:
    """Print the plan: per group the tests, per module the functions and the number of mutants (mutmut's own
    generator, which needs mutmut importable here); no test runs."""
    try:
        from mutmut.mutation.file_mutation import mutate_file_contents
    except ImportError:
        mutate_file_contents = None
    os.chdir(ROOT)  # mutmut reads [tool.mutmut] from the working directory
    total = 0
    for group in groups:
        print(f"group {group.name}: {' '.join(group.selection())}")
        if group.globs():
            print(f"  mutmut run {' '.join(group.globs())}")
        for key in group.keys:
            core = CORE[key]
            skipped = [f for f, plain in functions_of(ROOT / core.source).items() if not plain]
            n = "?"
            if mutate_file_contents is not None:
                names = mutate_file_contents(core.source, (ROOT / core.source).read_text()).mutant_names
                n = sum(1 for m in names if group.module_of(f"{module_name(core.source)}.{m}") == key)
                total += n
            what = ", ".join(core.functions) if core.functions else "every function"
            print(f"  {key}: {n} mutants in {what}")
            if skipped:
                print(f"    not mutated (decorated): {', '.join(skipped)}")
    print(json.dumps({"mutants": total, "groups": [g.name for g in groups]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--modules", nargs="+", metavar="KEY", help=f"CORE keys or prefixes (default: all): {', '.join(CORE)}"
    )
    parser.add_argument("--max-children", type=int, default=2, help="mutmut workers (default 2)")
    parser.add_argument(
        "--budget",
        type=float,
        default=3300.0,
        help="seconds for the whole run (default 3300); when they run out mutmut is stopped, the "
        "mutants it did not reach count as not_checked and later groups are not run",
    )
    parser.add_argument(
        "--survivors-file",
        type=Path,
        default=STAGE / "survivors.md",
        help="where the survivors' diffs go (default mutants/survivors.md)",
    )
    parser.add_argument("--list-survivors", action="store_true", help="also print each survivor's diff")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the mutant counts, run no test")
    args = parser.parse_args(argv)
    check_table()
    groups = plan(select(args.modules))
    if args.dry_run:
        dry_run(groups)
        return
    if importlib.util.find_spec("mutmut") is None:
        sys.exit(f"mutmut is not installed for {sys.executable} (pip install 'mutmut>=3.8')")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    start = time.monotonic()
    deadline = start + args.budget
    not_run = []
    for group in groups:
        if time.monotonic() >= deadline - 60:
            not_run += group.keys
            continue
        where = stage(group, pyproject)
        print(f"mutmut on {group.name} ({' '.join(group.selection())}); log: {where / 'mutmut.log'}", flush=True)
        run_group(group, where, args.max_children, deadline)
        read_statuses(group, where)
        c = counts(list(group.statuses.values()))
        stopped = " (stopped: out of budget)" if group.stopped else ""
        print(f"  {group.seconds:.0f} s{stopped}: {json.dumps(c)}", flush=True)
    ran = [g for g in groups if g.statuses]
    survivors_report(ran, args.survivors_file, args.list_survivors)
    by_module = {k: counts([v for n, v in g.statuses.items() if g.module_of(n) == k]) for g in ran for k in g.keys}
    for key, c in by_module.items():
        print(
            f"{key:20} {c['mutants']:5} mutants {c['killed']:5} killed {c['timeout']:4} timeout "
            f"{c['survived']:4} survived {c['no_tests']:4} no tests"
        )
    statuses = {n: v for g in ran for n, v in g.statuses.items()}
    result = {
        **counts(list(statuses.values())),
        "survived": sorted(n for n, v in statuses.items() if v == "survived"),
        "seconds": round(time.monotonic() - start, 1),
        "max_children": args.max_children,
        "not_run": not_run,
        "by_module": by_module,
        "survivors_file": str(args.survivors_file),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
