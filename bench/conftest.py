"""Benchmark fixtures (the run's roofline and the machine's description, bench/harness.py), the representative run
and where its JSON goes.

    pytest bench/ --benchmark-only            # every suite's representative cases, ~15 minutes on 2 cores

runs the cases of every suite (bench/bench_*.py) that are not marked `sweep`: a suite marks the values of its
parametrize axes beyond the representative ones (harness.representative) and its long sweeps as a whole. --sweeps
runs every case, as the committed tables in bench/results/ were made:

    pytest bench/ --benchmark-only --sweeps --ignore=bench/bench_generate.py --ignore=bench/bench_engine.py \
        --ignore=bench/bench_rlhf.py --ignore=bench/bench_train.py --ignore=bench/bench_packing.py \
        --benchmark-json=bench/results/kernels.json
    pytest bench/bench_generate.py --benchmark-only --sweeps --benchmark-json=bench/results/generation.json
    pytest bench/bench_train.py --benchmark-only --sweeps --benchmark-json=bench/results/train_step.json
    pytest bench/bench_packing.py --benchmark-only --sweeps --benchmark-json=bench/results/packing.json
    pytest bench/bench_engine.py --benchmark-only --sweeps --benchmark-json=bench/results/engine.json
    pytest bench/bench_rlhf.py --benchmark-only --sweeps -k "rlhf_step and not zero3 and not trl-cb" \
        --benchmark-json=bench/results/rlhf.json
    pytest bench/bench_rlhf.py --benchmark-only --sweeps -k zero3 --benchmark-json=bench/results/rlhf_zero3.json
    pytest bench/bench_rlhf.py --benchmark-only --sweeps -k scaling --benchmark-json=bench/results/rlhf_scaling.json
    pytest bench/bench_rlhf.py --benchmark-only --sweeps -k batch --benchmark-json=bench/results/rlhf_batch.json
    pytest bench/bench_rlhf.py --benchmark-only --sweeps -k curve --benchmark-json=bench/results/rlhf_curves.json
    pytest bench/bench_frozen.py --benchmark-only --sweeps --benchmark-json=bench/results/frozen_zero3.json
    pytest bench/bench_rlhf.py --benchmark-only --sweeps \
        -k "rlhf_step and fp32 and single and (grpo or rloo) and (ours] or trl] or trl-cb)" \
        --benchmark-json=bench/results/rlhf_trl_cb.json
    python bench/generate_vs_vllm.py --out bench/results/generation_vllm.json   # not a suite: vLLM runs elsewhere

Without --benchmark-json, the JSON goes to bench/results/run-<date>-<time>.json (ignored by git:
bench/results/.gitignore), and the terminal summary says where; it is written only if some benchmark ran.
"""

import os
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Before triton is first imported: Triton providers run in its interpreter on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import Roofline, machine_info, measure_roofline  # noqa: E402

RESULTS = Path(__file__).with_name("results")


def pytest_addoption(parser):
    parser.addoption("--sweeps", action="store_true",
                     help="also run the cases marked sweep (every case: the long sweeps and the full parametrizations "
                          "the committed bench/results tables were made with); bench/conftest.py lists the commands")


class _JsonTarget:
    """pytest-benchmark's --benchmark-json target (it expects an open file), opened only when the results are
    written, so that a run without benchmarks leaves no empty file behind."""

    def __init__(self, path: Path):
        self.name = str(path)

    def __enter__(self):
        self._file = open(self.name, "wb")
        return self._file

    def __exit__(self, *exc):
        self._file.close()

    def __repr__(self):
        return self.name


def pytest_configure(config):
    # Before pytest-benchmark's own pytest_configure (trylast), which reads the option into its session. The `sweep`
    # marker is declared in pyproject.toml.
    benchmarking = not (config.getoption("benchmark_disable", False) or config.getoption("benchmark_skip", False))
    if config.getoption("benchmark_json", None) is None and benchmarking and not config.option.collectonly:
        config.option.benchmark_json = _JsonTarget(RESULTS / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json")


def pytest_collection_modifyitems(config, items):
    if config.getoption("sweeps"):
        return
    sweeps = [item for item in items if item.get_closest_marker("sweep")]
    if sweeps:
        config.hook.pytest_deselected(items=sweeps)
        items[:] = [item for item in items if not item.get_closest_marker("sweep")]
    config._bench_sweeps_deselected = len(sweeps)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    deselected = getattr(config, "_bench_sweeps_deselected", 0)
    if deselected:
        terminalreporter.write_line(f"bench: {deselected} sweep cases not run (--sweeps runs every case: "
                                    "bench/conftest.py)")
    target = config.getoption("benchmark_json", None)
    if target is not None and os.path.exists(target.name):
        terminalreporter.write_line(f"bench: benchmark JSON written to {target.name}")


@pytest.fixture(scope="session")
def roofline() -> Roofline:
    return measure_roofline()


@pytest.fixture(scope="session")
def machine(roofline: Roofline) -> dict:
    return machine_info(roofline)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Ratios to a baseline provider of the same group, from this run's own rows: a benchmark that
    sets extra_info["baseline_provider"] = P gets extra_info["speedup_vs_P"]."""
    rows = output_json["benchmarks"]
    by_group = {(b["group"], b["extra_info"].get("provider")): b for b in rows}
    for b in rows:
        base = b["extra_info"].get("baseline_provider")
        ref = by_group.get((b["group"], base))
        if base and ref:
            b["extra_info"][f"speedup_vs_{base}"] = round(ref["stats"]["median"] / b["stats"]["median"], 3)
