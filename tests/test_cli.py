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


def test_the_old_module_path_still_runs_the_command_with_a_note():
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "hybrid_engine.cli", "env", "--help"], cwd=root, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert "usage: hybrid-engine env" in run.stdout and "python -m hybrid_engine.commands" in run.stderr


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="built-in presets: llama-20m, llama-125m, llama-tiny"):
        main(["generate", "--preset", "nope", "--max-new-tokens", "1"])


def test_bench_report_regenerates_the_committed_docs(tmp_path):
    """The committed README.md and docs/*.md are what `hybrid-engine bench report --docs` makes from the committed
    JSON, byte for byte: on copies with stale tables (a full table in docs/, a headline and the default run's table
    in the README) it writes every page's tables back, and the plots as PNG files. The old spelling `--readme` still
    works: it writes the tables whose markers that file has and names the ones that live in docs/. Without either
    the tables are printed, and an unknown name is a clear error."""
    import re
    import shutil

    from hybrid_engine.commands.report import PAGES, README, TABLES

    root, results = Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[1] / "bench" / "results"

    def report(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hybrid_engine.commands", "bench", "report", "--results",
                               str(results), *args], capture_output=True, text=True)

    def make_stale(page: Path, marker: str) -> None:
        start, end = f"<!-- bench:{marker}:start -->", f"<!-- bench:{marker}:end -->"
        text = page.read_text()
        stale = re.sub(re.escape(start) + ".*?" + re.escape(end), f"{start}\nstale\n{end}", text, flags=re.S)
        assert stale != text
        page.write_text(stale)

    shutil.copy(root / README, tmp_path / README)
    shutil.copytree(root / "docs", tmp_path / "docs")
    for marker in ("rlhf_scaling", "rlhf_headline", "train"):
        make_stale(tmp_path / README if PAGES[marker] == README else tmp_path / "docs" / PAGES[marker], marker)
    run = report("--docs", str(tmp_path / "docs"), "--plots", str(tmp_path / "plots"))
    assert run.returncode == 0, run.stderr
    for page in [README, *(f"docs/{p.name}" for p in (root / "docs").glob("*.md"))]:
        assert (tmp_path / page).read_bytes() == (root / page).read_bytes(), \
            f"{page} is not what `hybrid-engine bench report --docs docs` makes from bench/results: run it"
    for stem in TABLES:
        assert f"{stem}.json: table -> " in run.stdout or not (results / f"{stem}.json").is_file()
    assert (tmp_path / "plots" / "rlhf_phases.png").stat().st_size > 1000

    make_stale(tmp_path / README, "rlhf_headline")
    old = report("--only", "rlhf", "rlhf_zero3", "--readme", str(tmp_path / README), "--plots", str(tmp_path))
    assert old.returncode == 0, old.stderr
    assert (tmp_path / README).read_bytes() == (root / README).read_bytes()
    assert "rlhf, rlhf_zero3" in old.stderr and "--docs docs" in old.stderr
    printed = report("--only", "engine", "--plots", str(tmp_path))
    assert printed.returncode == 0 and "| target | variant |" in printed.stdout
    bad = report("--only", "nope")
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
