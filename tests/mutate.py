"""Mutation testing of the modules the correctness of a run rests on (`./just mutate`).

mutmut 3 names each mutant after its file's path and matches it against the module the tests import, so it
needs a tree where the path is the import name. deit-pipe's floors live in top-level folders mapped to
`deit_pipe.*` by setuptools; this script assembles that tree (deit_pipe/<floor>/..., tests/, a pyproject
with mutmut's settings) under work-data/mutation, runs mutmut there against the fast suite, and prints the
score per module and the surviving mutants (their diffs go to work-data/mutation/survivors.txt).

    python tests/mutate.py                  # a fresh run over every module below
    python tests/mutate.py --again          # rerun the previous run's survivors only (after adding tests)
    python tests/mutate.py --only optim/schedule.py
    python tests/mutate.py --check NAME tests/test_loss.py   # does this test file kill mutant NAME?
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
STAGING = ROOT / "work-data" / "mutation"  # --staging changes it (one tree per concurrent run)

# The modules issue 11 names: losses, optimizer and schedule, the epoch plan, the loader, the views, the store,
# the model registry. Paths are relative to the repository root.
MODULES = [
    "loss/deit.py",
    "loss/teacher_targets.py",
    "optim/schedule.py",
    "data/schedule.py",
    "data/view_dataset.py",
    "data/views.py",
    "data/mixing.py",  # split out of data/views.py after the score in the README was measured
    "data/rng.py",  # the same
    "storage/teacher_store.py",
    "models/registry.py",
    "distributed/checkpoint.py",  # added after the score in the README was measured
]

FAILED = {1, 3}  # a failing test, a pytest error
TIMEOUTS = {36, -24, 24, 152, 255}  # a mutant that hangs (a barrier that never opens) is killed by its timeout
KILLED = FAILED | TIMEOUTS


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # deit_pipe.<floor> -> folder
NO_CACHES = shutil.ignore_patterns("__pycache__", "*.pyc")


def copy_tests(*destinations: Path) -> None:
    """The repository's tests as they are now, into each destination folder."""
    for destination in destinations:
        shutil.copytree(ROOT / "tests", destination, dirs_exist_ok=True, ignore=NO_CACHES)


def assemble(modules: list[str]) -> None:
    """The staging tree: every floor under deit_pipe/, the tests, and mutmut's settings."""
    if STAGING.exists():
        shutil.rmtree(STAGING)
    STAGING.mkdir(parents=True)
    for package, folder in PACKAGE_DIRS.items():
        shutil.copytree(ROOT / folder, STAGING / Path(*package.split(".")), ignore=NO_CACHES)
    copy_tests(STAGING / "tests")
    package_of = {folder: package for package, folder in PACKAGE_DIRS.items()}
    only = []
    for module in modules:
        folder, name = module.split("/", 1)
        only.append("/".join(package_of[folder].split(".")) + "/" + name)
    settings = {
        "source_paths": ["deit_pipe"],
        "only_mutate": only,
        # the fast suite: no processes, seconds per module
        "pytest_add_cli_args": ["-m", "not slow", "-x", "-q", "-p", "no:cacheprovider"],
        "pytest_add_cli_args_test_selection": ["tests"],
        "use_git_change_detection": False,
        # A mutant that hangs (a barrier that never opens, a loop that never ends) is a kill: stop it at a
        # few times its tests' own duration instead of mutmut's 15x.
        "timeout_multiplier": 3.0,
        "timeout_constant": 10.0,
    }
    lines = ["[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    lines += ["", "[tool.pytest.ini_options]"] + [f"{key} = {json.dumps(value)}"
                                                  for key, value in PYPROJECT["tool"]["pytest"]["ini_options"].items()]
    (STAGING / "pyproject.toml").write_text("\n".join(lines) + "\n")


def mutmut(*args: str, log: Path | None = None) -> str:
    """Runs mutmut in the staging tree; its spinner goes to `log` when given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log or os.devnull, "w") as sink:
        done = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=STAGING, env=env, text=True,
                              stdout=subprocess.PIPE if log is None else sink, stderr=subprocess.STDOUT, check=False)
    return done.stdout or ""


def verdicts() -> dict[str, dict[str, int | None]]:
    """module (repository path) -> mutant name -> mutmut's exit code, from mutmut's .meta files."""
    out: dict[str, dict[str, int | None]] = {}
    for meta in sorted((STAGING / "mutants" / "deit_pipe").rglob("*.py.meta")):
        relative = meta.relative_to(STAGING / "mutants").with_suffix("")  # deit_pipe/loss/deit.py
        module = f"{PACKAGE_DIRS['.'.join(relative.parent.parts)]}/{relative.name}"
        out[module] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def report(results: dict[str, dict[str, int | None]]) -> list[str]:
    """Prints the score per module (killed = a test failed or the mutant timed out); returns the survivors."""
    def row(name: str, c: Counter) -> None:
        alive = c["mutants"] - c["failed"] - c["timeout"]
        score = 100 * (c["failed"] + c["timeout"]) / max(c["mutants"], 1)
        print(f"{name:26s} {c['mutants']:7d} {c['failed']:7d} {c['timeout']:7d} {alive:6d} {score:6.1f}%")

    survivors, total = [], Counter()
    print(f"{'module':26s} {'mutants':>7s} {'failed':>7s} {'timeout':>7s} {'alive':>6s} {'score':>7s}")
    for module, codes in results.items():
        count = Counter(mutants=len(codes), failed=sum(c in FAILED for c in codes.values()),
                        timeout=sum(c in TIMEOUTS for c in codes.values()))
        survivors += [name for name, code in codes.items() if code not in KILLED]
        total.update(count)
        row(module, count)
    row("all", total)
    return survivors


def main() -> None:
    global STAGING
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--again", action="store_true", help="rerun only the previous run's survivors and "
                        "timeouts (a loaded machine times out slow tests), with the tests as they are now")
    parser.add_argument("--only", action="append", help="a module path (repeatable); default: all of MODULES")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--check", metavar="NAME", help="run the given tests (the repository's, as they are now) "
                        "against mutant NAME of the last run's tree; exit status 0 = the mutant survives them")
    parser.add_argument("--staging", type=Path, default=STAGING, help=f"the mutated tree (default {STAGING})")
    args, pytest_args = parser.parse_known_args()
    STAGING = args.staging.resolve()
    if args.check:
        # `python -m` puts the working directory first on sys.path: the mutated tree shadows the installed one.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MUTANT_UNDER_TEST": args.check}
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                   *[str(Path(a).resolve()) if Path(a.split("::")[0]).exists() else a for a in pytest_args]]
        sys.exit(subprocess.run(command, cwd=STAGING / "mutants", env=env, check=False).returncode)
    if args.again:
        survivors = [name for codes in verdicts().values() for name, code in codes.items() if code not in FAILED]
        # fresh copies of the tests (the sources are unchanged), then only the survivors
        shutil.rmtree(STAGING / "tests")
        copy_tests(STAGING / "tests", STAGING / "mutants" / "tests")
        run = ["run", "--max-children", str(args.max_children), *survivors]
    else:
        assemble(args.only or MODULES)
        run = ["run", "--max-children", str(args.max_children)]
    print(f"mutmut runs the fast suite against each mutant; its log: {STAGING / 'mutmut.log'}", flush=True)
    mutmut(*run, log=STAGING / "mutmut.log")
    survivors = report(verdicts())
    with open(STAGING / "survivors.txt", "w") as out:
        for name in survivors:
            out.write(mutmut("show", name) + "\n")
    print(f"{len(survivors)} survivors; their diffs: {STAGING / 'survivors.txt'}")


if __name__ == "__main__":
    main()
