"""How the command ends as a process (commands/process.py): a user's mistake is one line and exit status 2 or 1,
--debug and bugs keep the traceback, and under a launcher the line is printed once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_engine.commands import main as main_module
from hybrid_engine.commands import process
from hybrid_engine.commands.common import parse_data
from hybrid_engine.commands.main import build_parser
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.ppo.update import finite_or_skip
from hybrid_engine.rlhf.reward_fn import call_with_timeout

ROOT = Path(__file__).resolve().parents[1]


def parsed(*argv: str):
    args = build_parser().parse_args(list(argv))
    return args, f"hybrid-engine {args.command}"


def test_a_missing_data_file_is_one_line_and_status_1(tmp_path, capsys):
    args, prog = parsed("sft", "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out"))
    assert process.run(args.func, args, prog) == 1
    assert capsys.readouterr().err == f"hybrid-engine sft: error: {tmp_path / 'nope.jsonl'}: no such data file\n"


def test_a_bad_flag_value_is_one_line_and_status_2(tmp_path, capsys):
    args, prog = parsed("sft", "--demo", "--eval-fraction", "2", "--output", str(tmp_path / "out"))
    assert process.run(args.func, args, prog) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrid-engine sft: error: --eval-fraction") and err.count("\n") == 1


def test_a_missing_ds_config_is_one_line(tmp_path, capsys):
    args, prog = parsed("sft", "--demo", "--ds-config", str(tmp_path / "ds.json"), "--output", str(tmp_path / "out"))
    assert process.run(main_module.run_command, args, prog) == 2
    assert capsys.readouterr().err == f"hybrid-engine sft: error: ds_config: no such file '{tmp_path / 'ds.json'}'\n"


@pytest.mark.parametrize("where", ["hybrid-engine --debug sft", "hybrid-engine sft ... --debug"])
def test_debug_keeps_the_traceback(tmp_path, where):
    flags = ["sft", "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out")]
    args, prog = parsed(*(["--debug", *flags] if "--debug sft" in where else [*flags, "--debug"]))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        process.run(args.func, args, prog)


def test_what_counts_as_a_users_mistake(tmp_path):
    def caught(fn):
        try:
            fn()
        except Exception as e:
            return e

    assert process.user_error_status(caught(lambda: parse_data("a.jsonl:x"))) == process.EXIT_USAGE
    assert process.user_error_status(caught(lambda: open(tmp_path / "missing"))) == process.EXIT_ERROR
    # A run that met NaN (nonfinite='stop', or every update skipped) and a reward function that timed out: one line.
    assert process.user_error_status(caught(lambda: finite_or_skip(False, "the scores", 3, PPOConfig(
        nonfinite="stop")))) == process.EXIT_ERROR
    timed_out = caught(lambda: call_with_timeout(lambda secs: time.sleep(secs), 0.01, {"secs": 0.5}))
    assert process.user_error_status(timed_out) == process.EXIT_ERROR
    # Raised outside hybrid_engine (here the test's own code, as a user's --reward-fn would be): a traceback.
    assert process.user_error_status(caught(lambda: int("x"))) is None
    assert process.user_error_status(caught(lambda: [][1])) is None


def test_a_bug_keeps_its_traceback():
    args, prog = parsed("env")

    def bug(_):
        raise ValueError("raised by code outside the package")

    with pytest.raises(ValueError, match="outside the package"):
        process.run(bug, args, prog)


def test_other_ranks_wait_then_name_themselves(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(process, "OTHER_RANKS_WAIT_S", 0.3)
    monkeypatch.setenv("RANK", "1")
    args, prog = parsed("sft", "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out"))
    start = time.perf_counter()
    assert process.run(args.func, args, prog) == 1
    assert time.perf_counter() - start >= 0.3
    assert capsys.readouterr().err.startswith("(rank 1) hybrid-engine sft: error: ")


def test_usage_errors_are_printed_by_the_first_rank_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["sft", "--lora-r", "many"])
    assert exit_.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sft", "--lora-r", "many"])
    assert "--lora-r: invalid int value: 'many'" in capsys.readouterr().err


def test_help_says_what_debug_does():
    assert "full traceback" in build_parser().format_help()
    sft = build_parser()._subparsers._group_actions[0].choices["sft"]
    assert "--debug" in sft.format_help()


@pytest.mark.slow
def test_the_program_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "hybrid_engine.commands", "sft", "--data", str(tmp_path / "no.jsonl"),
                          "--output", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr == f"hybrid-engine sft: error: {tmp_path / 'no.jsonl'}: no such data file\n"


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_the_line_is_printed_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "0", "-m", "hybrid_engine.commands", "sft", "--data", str(tmp_path / "no.jsonl"),
           "--output", str(tmp_path / "out")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    line = f"hybrid-engine sft: error: {tmp_path / 'no.jsonl'}: no such data file"
    assert (run.stdout + run.stderr).count(line) == 1, run.stderr
    assert "hybrid_engine/rlhf/data.py" not in run.stderr  # no worker's traceback (the launcher's own follows)
