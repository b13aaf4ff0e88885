"""The fenced blocks of the README and the hand-written docs pages, in page order, and the shell commands of their
sh blocks: what tests/test_readme.py parses and tests/test_examples.py runs."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE_PATHS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/*.md: the pages mkdocs builds

# A fence may be indented (a block inside a list item); it closes with the same indentation.
_FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```[ \t]*$", flags=re.S | re.M)


def page_name(path: Path) -> str:
    """README.md, docs/data.md, ...: the page's path in the repository."""
    return str(path.relative_to(ROOT))


def fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of a page, in order; an indented block's body is dedented."""
    return [(m.group(2), textwrap.dedent(m.group(3))) for m in _FENCE.finditer(text)]


def blocks(text: str, language: str) -> list[str]:
    """The bodies of a page's blocks in `language` (sh, python, yaml...)."""
    return [body for lang, body in fenced(text) if lang == language]


def shell_lines(body: str) -> list[str]:
    """The commands of an sh block: `\\` continuations joined, comments after ` #` and blank lines dropped."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+", " ", line.split(" #")[0]).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out
