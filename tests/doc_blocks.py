"""The fenced code blocks of the README and of docs/*.md, as a new user copies them (the docs tests run or load
them). A block that cannot run as printed in a test says so on the line just above its fence, invisible on GitHub:

    <!-- not run by tests/test_docs.py: REASON -->
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run by tests/test_docs\.py:(.*)-->")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # the line of the opening fence, from 1
    lang: str  # what follows the opening fence: python, bash, yaml, text
    code: str
    not_run: str | None  # the marker's reason; None: the block has no marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(lang: str | None = None) -> list[Block]:
    """Every fenced block of the pages in page order (only those of `lang` when given)."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            above = text[:max(match.start() - 1, 0)].rpartition("\n")[2]  # the line just above the fence
            marker = NOT_RUN.fullmatch(above.strip())
            block = Block(page, text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2),
                          marker.group(1).strip() if marker else None)
            if lang is None or block.lang == lang:
                found.append(block)
    return found


def commands(code: str) -> list[str]:
    """The block's commands, one per line: continuation lines joined, blank lines dropped."""
    return [line.strip() for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def by_code(found: list[Block]) -> dict[str, list[str]]:
    """{code: where it is printed} of `found`: a block printed on several pages runs once."""
    out: dict[str, list[str]] = {}
    for block in found:
        out.setdefault(block.code, []).append(block.where)
    return out


def pythonpath() -> str:
    """PYTHONPATH with this checkout first, so that a block's process imports the package under test."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
