"""Run a tox environment where only python3 and pip exist: `python3 dev.py demo` or `python3 dev.py tests`.

tox is installed into .tox/bootstrap with `pip install --target`, which needs neither the venv
module (absent from Debian's python3 without python3-venv) nor a writable system Python (PEP 668
marks many as externally managed); tox then builds each environment with its own virtualenv.
Anything after the environment name goes to tox: `python3 dev.py tests -- -k losses`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BOOTSTRAP = Path(__file__).resolve().parent / ".tox" / "bootstrap"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if sys.version_info < (3, 10):
        fail(f"unisd needs Python >= 3.10; this is {sys.version.split()[0]}")
    if not argv or argv[0].startswith("-"):
        fail("name a tox environment: python3 dev.py demo|tests [TOX ARGS...]")
    if not (BOOTSTRAP / "tox").is_dir():
        install = [sys.executable, "-m", "pip", "install", "-q", "--target", str(BOOTSTRAP), "tox>=4"]
        if subprocess.call(install) != 0:
            fail(f"could not install tox into {BOOTSTRAP} with {sys.executable} -m pip")
    sys.path.insert(0, str(BOOTSTRAP))
    from tox.run import run

    run(["-e", argv[0], *argv[1:]])  # exits with tox's status


if __name__ == "__main__":
    main(sys.argv[1:])
