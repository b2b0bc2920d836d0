"""Every code block of the README and of docs/ is checked: the blocks are what a new user copies first. Python blocks
run as printed here, on a fresh process in an empty folder; bash blocks in test_docs_bash.py, YAML config files in
test_docs_yaml.py. A bash block that cannot run in a test carries a marker with the reason (doc_blocks.py), and is
checked another way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from doc_blocks import blocks, by_code, pythonpath

from hybrid_engine.rlhf.data import STEPS, load_file

CHECKED = {"python": "run here", "bash": "test_docs_bash.py", "yaml": "test_docs_yaml.py",
           "jsonl": "read here as data rows", "text": "not code: a diagram or a listing"}
"""Each kind of block the pages may hold, and what checks it."""
MAX_NOT_RUN = 8
"""The README's set-up, main job, test and other-commands blocks, the benchmark commands, docs/rlhf.md's accelerate
launch (two processes) and its several-nodes launches and Slurm script (two machines); raise it only for a block that
truly cannot run in a test."""

PYTHON = by_code(blocks("python"))
"""Each Python block by its code, with where it is printed."""


def test_the_pages_have_python_blocks():
    assert len(PYTHON) >= 6 and sum(map(len, PYTHON.values())) >= 8  # the README's four examples and the docs' own


def test_every_block_is_of_a_kind_a_test_checks():
    found = {b.where: b.lang for b in blocks()}
    assert len(found) >= 15, found
    unchecked = {where: lang for where, lang in found.items() if lang not in CHECKED}
    assert not unchecked, f"blocks no test checks (give a known language, {sorted(CHECKED)}): {unchecked}"


def test_few_blocks_are_not_run_and_each_says_why():
    not_run = [b for b in blocks() if b.not_run is not None]
    assert 0 < len(not_run) <= MAX_NOT_RUN, [b.where for b in not_run]
    for block in not_run:
        assert block.lang == "bash", f"{block.where}: only a bash block may be left unrun"
        assert len(block.not_run.split()) >= 3, f"{block.where}: the marker gives no reason"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.where) for b in blocks("jsonl")])
def test_each_row_of_a_jsonl_block_is_read_by_a_step(tmp_path, block):
    """A data example is rows some step reads (rlhf/data.py, formats.py); PPO reads a prompt from every kind."""
    for number, line in enumerate(block.code.splitlines(), start=1):
        path = tmp_path / f"row{number}.jsonl"
        path.write_text(line + "\n", encoding="utf-8")
        read = []
        for step in STEPS:
            try:
                read.append(len(load_file(path, step, cache_dir=str(tmp_path / "cache"))) == 1 and step)
            except ValueError:
                pass
        assert "ppo" in read and len([s for s in read if s]) >= 2, f"{block.where}, row {number}: read by {read}"


@pytest.mark.slow
@pytest.mark.parametrize("code", list(PYTHON), ids=[" = ".join(where) for where in PYTHON.values()])
def test_a_python_block_runs_as_printed(tmp_path, code):
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": pythonpath(), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"{PYTHON[code]}:\n{proc.stderr[-4000:]}"
