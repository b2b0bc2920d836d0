import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_engine.commands.main import build_parser, main


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


def test_bench_report_writes_every_table_and_plot(tmp_path):
    """The committed results through `hybrid-engine bench report`: each table between its README markers, the
    plots as PNG files, and a clear error for an unknown name."""
    import shutil

    from hybrid_engine.commands.report import TABLES

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- bench:{marker}:start -->\nold\n<!-- bench:{marker}:end -->\n"
                              for marker, _ in TABLES.values()))
    copied = tmp_path / "results"
    shutil.copytree(results, copied)
    run = subprocess.run([sys.executable, "-m", "hybrid_engine.commands", "bench", "report", "--results", str(copied),
                          "--readme", str(readme), "--plots", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = readme.read_text()
    present = [stem for stem in TABLES if (copied / f"{stem}.json").is_file()]
    assert present and "old" not in text.split("<!-- bench:rlhf:start -->")[1].split("<!-- bench:rlhf:end -->")[0]
    for stem in present:
        assert f"{copied / stem}.json: table" in run.stdout
    assert "Machine:" in text and (tmp_path / "rlhf_phases.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "hybrid_engine.commands", "bench", "report", "--only", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown results ['nope']" in bad.stderr


def test_machine_line_names_the_cpu_family_where_recorded():
    from hybrid_engine.commands.report.tables import machine_line

    info = {"cpu": "AMD EPYC", "capability": "AVX512", "cpu_units": ["avx512_bf16"], "threads": 2,
            "read_GBps": 33.7, "matmul_GFLOPps": 168.4, "roofline_fraction": 0.75}
    line = machine_line([{"extra_info": {**info, "cpu_id": "AuthenticAMD family 25 model 17"}}])
    assert line.startswith("Machine: AMD EPYC (AuthenticAMD family 25 model 17), AVX512, avx512_bf16, 2 threads")
    assert machine_line([{"extra_info": info}]).startswith("Machine: AMD EPYC, AVX512")  # results made before it


def test_batch_table_pairs_each_row_with_its_baseline_at_the_same_batch(tmp_path):
    """rlhf_batch.json's rows: each ratio against the baseline of the same algorithm and prompts per step, the
    samples per step in the row, and a plot."""
    from hybrid_engine.commands.report import plot_rlhf, rlhf

    def row(provider, prompts, step_s):
        return {"extra_info": {
            "provider": provider, "algo": "grpo", "precision": "fp32", "setup": "single", "size": "10M",
            "completion": 32, "prompts": prompts, "baseline": "trl", "cpu": "AMD EPYC", "capability": "AVX2",
            "threads": 2, "read_GBps": 30.0, "matmul_GFLOPps": 150.0, "params_M": 10.81, "step_s": step_s,
            "samples_per_s": 4 * prompts / step_s, "generated_tokens_per_s": 100.0, "mean_response_tokens": 31.6,
            "peak_rss_mb": 900, "rewards": [0.4, 0.5], "settings": {"prompts": prompts, "generations": 4,
                                                                     "completion": 32, "steps": 3}}}

    data = {"benchmarks": [row("ours", 2, 0.5), row("trl", 2, 1.0), row("ours", 8, 1.0), row("trl", 8, 3.0)]}
    lines = rlhf.batch_table(data).splitlines()
    assert lines[1].startswith("4 samples per prompt, 3 steps")
    rows = [line for line in lines if line.startswith("| grpo")]
    assert [r.split(" | ")[1] for r in rows] == ["8", "8", "32", "32"]
    assert [r.split(" | ")[-1] for r in rows] == ["2.00x |", "1.00x |", "3.00x |", "1.00x |"]
    assert plot_rlhf.plot_batch(data, tmp_path)[0].stat().st_size > 1000
