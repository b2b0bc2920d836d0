"""token_logprobs against eager `log_softmax(hidden @ weight.T / T).gather(...)` and torch.compile of it.

N=4096 tokens through a V=32000, H=2048 fp32 LM head, forward alone and forward + backward. Time is
measured in this process; peak memory in a fresh subprocess per provider (`python bench_logprobs.py
peak PROVIDER MODE`): after one warm-up call (which also compiles), the process's peak RSS is reset
(/proc/self/clear_refs), the call runs once, and the rise of the peak over the RSS before the call
is the op's peak extra memory (outputs and gradients included, inputs excluded).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from harness import baseline_time, record, representative, run_benchmark

N, V, H, TEMPERATURE = 4096, 32000, 2048, 1.0
PROVIDERS = ["ours", "eager", "compile"]
MODES = ["forward", "forward_backward"]


def eager(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(hidden @ weight.T / TEMPERATURE, -1).gather(-1, tokens[:, None]).squeeze(-1)


def make_call(provider: str, mode: str):
    """A no-argument callable running one forward (or forward + backward) of `provider`."""
    from hybrid_engine.ops import token_logprobs

    torch.manual_seed(0)
    backward = mode == "forward_backward"
    hidden = torch.randn(N, H).requires_grad_(backward)
    weight = torch.randn(V, H).mul_(H**-0.5).requires_grad_(backward)
    tokens = torch.randint(0, V, (N,))
    fn = {
        "ours": lambda h, w, t: token_logprobs(h, w, t, TEMPERATURE),
        "eager": eager,
        "compile": torch.compile(eager),
    }[provider]
    if not backward:
        return lambda: fn(hidden, weight, tokens)

    def forward_backward():
        fn(hidden, weight, tokens).sum().backward()
        # Hand the gradients to the caller: the next call starts without them (fresh, not accumulated).
        grads = hidden.grad, weight.grad
        hidden.grad = weight.grad = None
        return grads

    return forward_backward


def _peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: after fork + exec that also keeps the
    parent's peak (here the benchmark process, which has just run eager), hiding ours."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def peak_extra_mib(provider: str, mode: str) -> float:
    """Run in a fresh process: the peak memory one call adds on top of its inputs, in MiB."""
    call = make_call(provider, mode)
    call()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _peak_rss_mib()
    call()
    return _peak_rss_mib() - before


def measure_peak_in_subprocess(provider: str, mode: str) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "peak", provider, mode], capture_output=True, text=True, check=True, timeout=600
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


_peaks: dict[tuple[str, str], float] = {}


def peak(provider: str, mode: str) -> float:
    if (provider, mode) not in _peaks:
        _peaks[provider, mode] = measure_peak_in_subprocess(provider, mode)
    return _peaks[provider, mode]


# Representative: ours' forward alone (4 s a call on 2 cores); its speedup and memory ratio time the eager reference.
@pytest.mark.parametrize("mode", representative(MODES, "forward"))
@pytest.mark.parametrize("provider", representative(PROVIDERS, "ours"))
def test_token_logprobs(benchmark, provider, mode, machine, roofline):
    call = make_call(provider, mode)
    benchmark.group = f"token_logprobs {mode} N={N} V={V} H={H} fp32"
    run_benchmark(benchmark, call, rounds=3)
    gemms = 1 if mode == "forward" else 3
    # Useful work: the GEMMs (1 forward, 2 more backward; our backward's recomputation is overhead,
    # not work) and the softmax's few operations per logit. Bytes: the fp32 inputs read once, and
    # for the backward read again and their gradients written.
    elementwise = 5 * N * V if mode == "forward" else 10 * N * V
    bytes_moved = 4 * (N * H + V * H) * (1 if mode == "forward" else 3)
    record(
        benchmark,
        provider=provider,
        baseline_s=baseline_time(f"token_logprobs {mode}", make_call("eager", mode)),
        machine=machine,
        roofline=roofline,
        bytes_moved=bytes_moved,
        flops=gemms * 2 * N * V * H + elementwise,
        tokens_per_s=round(N / benchmark.stats.stats.median, 1),
        peak_memory_MB=round(peak(provider, mode), 1),
        memory_ratio_vs_eager=round(peak("eager", mode) / max(peak(provider, mode), 1e-3), 2),
    )


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "peak":
    print(json.dumps({"peak_mib": peak_extra_mib(sys.argv[2], sys.argv[3])}))
