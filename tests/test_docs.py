"""Every Python block of the README and of docs/ runs as printed, on a fresh process in an empty folder: the blocks
are what a new user copies first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list:
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(pytest.param(page, line, match.group(1), id=f"{page.relative_to(ROOT)}:{line}"))
    return blocks


BLOCKS = python_blocks()


def test_the_pages_have_python_blocks():
    assert len(BLOCKS) >= 8  # the README's four examples and the docs' own: a broken pattern would find none


@pytest.mark.slow
@pytest.mark.parametrize("page, line, code", BLOCKS)
def test_a_python_block_runs_as_printed(tmp_path, page, line, code):
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"{page.name} line {line}:\n{proc.stderr[-4000:]}"
