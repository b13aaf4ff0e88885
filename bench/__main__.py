"""One way into the benchmarks: `python -m bench NAME [ARGS...]` runs `bench/NAME.py`'s `main(argv)`.

    python -m bench --list          the benchmarks and the first line of each one's docstring

Each benchmark writes its JSON under bench/results/ through `bench.provenance.write`, so every result names
the command that reproduces it, the commit, the library versions and the CPU.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

NOT_BENCHMARKS = {"provenance"}


def benchmarks() -> dict[str, str]:
    """name -> the first line of its docstring, for every module in this folder that defines `main`.

    Read from the source, not imported, so the list costs nothing and shows benchmarks whose optional
    dependencies (vLLM, a GPU) this environment lacks.
    """
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem.startswith("_") or path.stem in NOT_BENCHMARKS:
            continue
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            found[path.stem] = (ast.get_docstring(tree) or "").strip().split("\n")[0]
    return found


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        for name, line in sorted(benchmarks().items()):
            print(f"{name:20s} {line}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in benchmarks():
        print(f"error: no benchmark {name!r}; python -m bench --list names them", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
