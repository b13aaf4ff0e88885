"""One way into the benchmarks: `python -m bench NAME [ARGS...]` runs `bench/NAME.py`'s `main(argv)`.

    python -m bench --list          the benchmarks and the first line of each one's docstring

Each benchmark writes its JSON under bench/results/ through `bench.provenance.write`, so every result names
the command that reproduces it, the commit, the library versions and the CPU.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

NOT_BENCHMARKS = {"provenance"}


def benchmarks() -> dict[str, str]:
    """name -> the first line of its docstring, for every module in this folder that has a `main`."""
    found = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("_") or info.name in NOT_BENCHMARKS:
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if hasattr(module, "main"):
            found[info.name] = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    return found


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        for name, line in sorted(benchmarks().items()):
            print(f"{name:20s} {line}")
        return 0
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError:
        print(f"error: no benchmark {name!r}; python -m bench --list names them", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
