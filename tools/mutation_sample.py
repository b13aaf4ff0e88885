"""A seeded random sample of one file's mutants, each run against the tests that reach its function.

mutmut itself runs a file's mutants in source order, so a run stopped early has tested only the first
functions. This runs them in a seeded random order instead (stop it at any time: what it has done is a
random sample, and it resumes where it stopped), one after another in a single pytest process, each
against the tests mutmut's stats pass found reaching the mutated function, fastest first, stopping at the
first failure. First let mutmut create mutants/ and its stats (running one mutant does both; pyproject's
`also_copy` puts tools/ there too), then run this from inside mutants/, so that `python -m` finds the mutated
`unisd` before the installed one:

    OMP_NUM_THREADS=1 mutmut run "unisd.train.x_prepare__mutmut_1"
    cd mutants && OMP_NUM_THREADS=1 python -m tools.mutation_sample unisd/train.py --out ../train.json

It prints one line per mutant (its name, pytest's exit code, the first failing test) and, at the end or
on Ctrl-C, the share killed with its exact 95% interval. Tests that start another process (torchrun,
`python -m unisd`) do not see the mutant: mutmut switches mutants by an environment variable that is read
in this process only.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from unisd import stats


class Timeout(Exception):
    """A mutant that made the tests run far past their time (e.g. an endless loop)."""


def _alarm(*_: object) -> None:
    raise Timeout


INTERRUPTED: list[bool] = []  # pytest turns Ctrl-C into an exit code, as it does a collection error: this tells them apart


def _interrupt(*_: object) -> None:
    INTERRUPTED.append(True)
    raise KeyboardInterrupt


def run_one(name: str, tests: list[str], limit_s: int) -> list:
    """[pytest's exit code or "timeout", the first failing test] of one mutant."""
    os.environ["MUTANT_UNDER_TEST"] = name
    output = io.StringIO()
    signal.alarm(limit_s)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code: int | str = int(pytest.main(["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                                               "-m", "not slow and not realdata and not torchrun", *tests]))
    except Timeout:
        code = "timeout"
    finally:
        signal.alarm(0)
    failed = [line for line in output.getvalue().splitlines() if line.startswith(("FAILED", "ERROR"))]
    return [code, failed[0][:160] if failed else ""]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutation_sample", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the mutated source file, e.g. unisd/train.py")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (resumed if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out.absolute()
    if not Path("mutmut-stats.json").is_file():
        print("error: no mutmut-stats.json here: run this from inside mutmut's mutants/ folder", file=sys.stderr)
        return 2
    names = sorted(json.loads(Path(f"{args.file}.meta").read_text())["exit_code_by_key"])
    random.Random(args.seed).shuffle(names)
    recorded = json.loads(Path("mutmut-stats.json").read_text())
    tests_of, seconds = recorded["tests_by_mangled_function_name"], recorded["duration_by_test"]
    done = json.loads(out.read_text()) if out.exists() else {}
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        for name in [n for n in names if n not in done]:
            tests = sorted(tests_of.get(name.rsplit("__mutmut_", 1)[0], []), key=lambda t: seconds.get(t, 0.0))
            started = time.time()
            result = run_one(name, tests, int(3 * sum(seconds.get(t, 0.0) for t in tests)) + 60) if tests \
                else [None, "no tests"]
            if INTERRUPTED:
                break
            done[name] = [*result, round(time.time() - started, 1)]
            print(name, *done[name], flush=True)
            out.write_text(json.dumps(done, indent=1))
    except KeyboardInterrupt:
        pass
    if not done:
        return 0
    killed = sum(1 for code, *_ in done.values() if code not in (0, None))
    low, high = stats.proportion_ci(killed, len(done))
    print(f"{args.file}: {killed} of {len(done)} run ({len(names)} in all) killed: {100 * killed / len(done):.1f}% "
          f"[{100 * low:.1f}, {100 * high:.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
