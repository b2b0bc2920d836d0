import pytest

from hybrid_engine.cli import build_parser, main


def test_env_reports_the_ops(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "CPU capability" in out and "decode_attention" in out and "FAILED" not in out


def test_generate_runs_and_matches_hf(capsys):
    assert main(["generate", "--preset", "llama-tiny", "--batch", "2", "--prompt-len", "8", "--max-new-tokens", "4",
                 "--compare-hf"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "greedy sequences identical to transformers: True" in out


def test_help_explains_every_flag():
    parser = build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    for action in gen._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="built-in presets: llama-20m, llama-125m, llama-tiny"):
        main(["generate", "--preset", "nope", "--max-new-tokens", "1"])
