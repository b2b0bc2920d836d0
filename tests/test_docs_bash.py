"""Every bash block of the README and of docs/ runs as printed, with bash in a fresh empty folder where `hybrid-engine`
is this checkout's command, and leaves the outputs it names. A block marked not run (doc_blocks.py) has each line
checked instead: a `hybrid-engine` line parses, a `pytest` line collects benchmarks, an `accelerate launch` line parses
by accelerate's flags and ours, a `torchrun` (or `srun torchrun`) or `deepspeed` line by its launcher's flags and ours,
a line that sets a shell variable is taken as it is, and any other is a command CI (.ci/run) runs, as printed but for
pip's -q."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser
from deepspeed.launcher.runner import parse_args as deepspeed_parse_args
from doc_blocks import ROOT, blocks, by_code, commands, pythonpath
from torch.distributed.run import get_args_parser as torchrun_parser

from hybrid_engine.commands.main import build_parser

RUN = by_code([b for b in blocks("bash") if b.not_run is None])
"""Each bash block that runs, by its code, with where it is printed (the README and docs/rlhf.md share one)."""
OPERATORS = {">", ">>", "|", "&&", "||", ";"}


def words(line: str) -> list[str]:
    """The line's first command as the shell splits it: comments dropped, up to the first operator."""
    out = []
    for word in shlex.split(line, comments=True):
        if word in OPERATORS:
            break
        out.append(word)
    return out


NOT_RUN = [(b.where, line) for b in blocks("bash") if b.not_run is not None for line in commands(b.code) if words(line)]
"""(where, line) of every command of the blocks not run."""


def named_outputs(code: str) -> list[str]:
    """What the block's commands say they write: each --output folder and each file a `>` redirect fills."""
    found = []
    for line in commands(code):
        tokens = shlex.split(line, comments=True)
        found += [after for before, after in zip(tokens, tokens[1:]) if before in ("--output", ">")]
    return found


def test_the_pages_have_bash_blocks_to_run_and_the_steps_show_their_data_split():
    assert len(RUN) >= 2 and sum(len(where) for where in RUN.values()) >= 3, RUN
    steps = [code for code in RUN if "hybrid-engine sft" in code]
    assert steps and all("--data " in code and "--data-split" in code for code in steps)
    assert any(len(named_outputs(code)) >= 5 for code in RUN)  # the pattern finds the step-by-step block's outputs


@pytest.mark.slow
@pytest.mark.parametrize("code", list(RUN), ids=[" = ".join(where) for where in RUN.values()])
def test_a_bash_block_runs_as_printed(tmp_path, code):
    shim = tmp_path / "bin" / "hybrid-engine"  # the command of this checkout, not of another install
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m hybrid_engine.commands "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "block.sh").write_text(code, encoding="utf-8")
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": pythonpath(),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["bash", "-e", "-x", "-o", "pipefail", str(tmp_path / "block.sh")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{RUN[code]}:\n{proc.stderr[-6000:]}"
    for name in named_outputs(code):
        path = work / name
        assert path.exists() and (any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0), \
            f"{RUN[code]}: {name} is missing or empty"


@pytest.mark.parametrize("where, line", [pytest.param(w, line, id=f"{w} {' '.join(words(line)[1:3])}")
                                         for w, line in NOT_RUN if words(line)[0] == "hybrid-engine"])
def test_a_hybrid_engine_line_not_run_parses(where, line):
    try:
        build_parser().parse_args(words(line)[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{line}` is refused by the command's flags")


def is_accelerate_launch(line: str) -> bool:
    return words(line)[:2] == ["accelerate", "launch"]


@pytest.mark.parametrize("where, line", [pytest.param(w, line, id=w) for w, line in NOT_RUN
                                         if is_accelerate_launch(line)])
def test_an_accelerate_launch_line_not_run_parses_and_names_a_config_of_the_docs(where, line):
    """accelerate's parser takes its flags, ours the command after `-m hybrid_engine.commands`, and its
    --config_file is the file an accelerate config block of the docs is saved as (test_docs_yaml.py)."""
    try:
        launched = launch_command_parser().parse_args(words(line)[2:])
        build_parser().parse_args(launched.training_script_args)
    except SystemExit:
        pytest.fail(f"{where}: `{line}` is refused by accelerate launch's flags or the command's")
    assert launched.module and launched.training_script == "hybrid_engine.commands", where
    configs = [b.code for b in blocks("yaml") if b.code.startswith(f"# accelerate launch --config_file "
                                                                   f"{launched.config_file}\n")]
    assert configs, f"{where}: no accelerate config block of the docs is {launched.config_file}"


LAUNCHERS = ("torchrun", "deepspeed")
SETS_A_VARIABLE = re.compile(r"(export\s+)?[A-Za-z_][A-Za-z0-9_]*=\S.*")


def launch(line: str) -> tuple[bool, str, list[str]] | None:
    """(whether it runs a module, the script or module, its arguments) of a torchrun, `srun torchrun` or deepspeed
    line, parsed by the launcher's own flags; None for any other line."""
    found = words(line)
    if found[0] == "srun":
        found = found[next((i for i, w in enumerate(found) if w in LAUNCHERS), len(found) - 1):]
    if found[0] == "torchrun":
        args = torchrun_parser().parse_args(found[1:])
        return args.module, args.training_script, args.training_script_args
    if found[0] == "deepspeed":
        args = deepspeed_parse_args(found[1:])
        return args.module, args.user_script, args.user_args
    return None


@pytest.mark.parametrize("where, line", [pytest.param(w, line, id=f"{w} {words(line)[0]}") for w, line in NOT_RUN
                                         if words(line)[0] in ("srun", *LAUNCHERS)])
def test_a_launcher_line_not_run_parses_by_its_flags_and_ours(where, line):
    try:
        module, script, args = launch(line)
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `{line}` is refused by its launcher's flags or the command's")
    assert module and script == "hybrid_engine.commands", where


def test_every_other_line_not_run_is_what_ci_runs():
    ci = {line.strip().replace("pip install -q ", "pip install ") for line in (ROOT / ".ci" / "run").read_text()
          .splitlines()}
    others = [(where, line) for where, line in NOT_RUN if words(line)[0] not in ("hybrid-engine", "pytest", "srun",
                                                                                 *LAUNCHERS)
              and not is_accelerate_launch(line) and not SETS_A_VARIABLE.fullmatch(line)]
    assert len(others) >= 2, others  # the README's set-up and test commands
    for where, line in others:
        assert line in ci, f"{where}: `{line}` is neither run by CI (.ci/run) nor checked otherwise"


@pytest.mark.slow
def test_each_benchmark_line_not_run_collects_benchmarks(tmp_path):
    lines = [(where, line) for where, line in NOT_RUN if words(line)[0] == "pytest"]
    assert len(lines) >= 5, lines
    argvs = [[_json_into(word, tmp_path / f"{i}.json") for word in words(line)[1:]] for i, (_, line) in
             enumerate(lines)]
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("collect_worker.py")), json.dumps(argvs)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    counts = [json.loads(out[len("COLLECTED "):]) for out in proc.stdout.splitlines() if out.startswith("COLLECTED ")]
    assert proc.returncode == 0 and counts, proc.stdout[-3000:] + proc.stderr[-3000:]
    for (where, line), count in zip(lines, counts[0]):
        assert count, f"{where}: `{line}` collects no benchmark"


def _json_into(word: str, path: Path) -> str:
    """--benchmark-json=FILE pointed at `path`, once FILE is known to be a committed result the report reads; any
    other word as it is. (pytest-benchmark opens the file even to collect: the committed one must not be emptied.)"""
    flag, sep, target = word.partition("=")
    if flag != "--benchmark-json" or not sep:
        return word
    assert (ROOT / target).is_file() and Path(target).parent == Path("bench/results"), f"{target}: not a result file"
    return f"{flag}={path}"
