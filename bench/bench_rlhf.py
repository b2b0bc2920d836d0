"""RLHF end to end against the systems users would pick instead (issue 13): our GRPO and RLOO against TRL 1.16's
GRPOTrainer and RLOOTrainer, and against TRL with apply_hybrid_engine on its model; our PPO against the HF baseline
PPO (hybrid_engine/benchmarks/hf_ppo.py: HF generate and eager PyTorch, what the DeepSpeed-Chat paper calls the HF
baseline; TRL 1.16 has no PPO trainer); our PPO under DeepSpeed ZeRO-3 on two torchrun ranks against the same PPO
with the actor's generation done by HF generate on the ZeRO-3 module (deepspeed: DeepSpeed without a hybrid engine,
hybrid_engine/benchmarks/ds_generate.py), with the actor full and with peft LoRA; and ours with its kernels turned off
(ours-reference: the same run inside use_backend("reference")), so that the kernels' share of the gain shows apart
from the engine's. Colossal-AI is not measured, because its latest release on the index (colossalai 0.5.0) pins
torch<=2.5.1 and transformers==4.51.3 and its ColossalChat code is not in the package, so it cannot share this
environment.

Each case runs bench/rlhf_worker.py in a process of its own, or two for the ZeRO-3 setups (one thread each; peak
memory is the run's, both ranks' summed), each rank taking half of every step's prompts: the same ~10M Llama
made from a config, 8 prompts x 4 samples per step, 32 new tokens, lr 1e-5, KL 0.04 (GRPO), 0.05 (RLOO) or 0.1
(PPO, PPOConfig's default; its critic starts on both sides from the actor's body with the same fresh value head
and trains at critic_lr 5e-6), training in fp32 or under bf16 autocast (the same on both sides), the rule score as
the reward. Every case runs twice, the rounds interleaved, and reports its faster round: the median step time
after the first (warm-up) step (a wall clock from the step's first call to the end of its optimizer step, the same
span for every provider: hybrid_engine/benchmarks/step_clock.py), samples/s, generated tokens/s, peak resident
memory, the phase split (generate_s, experience_s, train_s: each phase's own timer, their sum at most the step's),
and the reward per step (equal learning: a speed-up must not come from doing less). `hybrid-engine
bench report --only rlhf --docs docs` makes its tables and bench/rlhf_phases.png; ratios are against the
baseline at the same algorithm, precision and setup in the same run: TRL for grpo and rloo, hf for ppo in one
process, deepspeed under ZeRO-3.

Each committed table's command (with --sweeps) is in bench/conftest.py's docstring. Without --sweeps only REPRESENTATIVE
runs: GRPO against TRL and PPO against the HF baseline, fp32, one process; the scaling, batch and curve runs are
sweeps.

The scaling runs (test_rlhf_scaling) time ours against each algorithm's baseline over model size (SIZES: ~10M,
~50M, ~125M parameters) at 32 new tokens, and over response length (LENGTHS, up to 512 new tokens) at ~10M,
in fp32 with two interleaved rounds of 3 steps each. The batch runs (test_rlhf_batch) do the same over the prompts
per step (BATCHES, 4 samples each) at ~10M and 32 new tokens. The reward-curve runs
(test_rlhf_curve) run each algorithm's pair for CURVE_STEPS steps at CURVE_LR, in fp32, once for each of
CURVE_SEEDS, and record the reward at every step.

Only the selected cases run (-k). The 22 single-process cases took 13 minutes on 2 cores (two rounds each), the
18 curve runs (6 pairs' members x 3 seeds) 24, the 18 batch cases (two rounds each) 17.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import measure_roofline, representative

from hybrid_engine.benchmarks.rlhf_roofline import phase_work, roofline_fractions
from hybrid_engine.benchmarks.step_clock import PHASES, untimed_s

WORKER = Path(__file__).with_name("rlhf_worker.py")
SETUPS = {"single": [], "zero3": ["--zero3"], "zero3-lora": ["--zero3", "--lora"]}
"""How a case runs: one process (every thread), or two torchrun ranks under DeepSpeed ZeRO-3 (one thread each),
the actor full or with peft LoRA."""
PROVIDERS = {("grpo", "single"): ["ours", "ours-reference", "trl", "trl-patched", "trl-cb"],
             ("rloo", "single"): ["ours", "ours-reference", "trl", "trl-patched", "trl-cb"],
             ("ppo", "single"): ["ours", "ours-reference", "hf"],
             ("ppo", "zero3"): ["ours", "deepspeed"], ("ppo", "zero3-lora"): ["ours", "deepspeed"]}
"""The providers of each algorithm and setup: TRL's trainers for grpo and rloo (trl-cb: generating with transformers'
continuous batching, use_transformers_continuous_batching, in place of vLLM, whose CPU engine cannot take TRL's weight
updates: docs/benchmarks.md), the HF baseline
(hybrid_engine/benchmarks/hf_ppo.py) for ppo, and DeepSpeed without a hybrid engine
(hybrid_engine.benchmarks.ds_generate) under ZeRO-3."""
BASELINE = {"trl": "trl", "hf": "hf", "deepspeed": "deepspeed"}
BETA = {"grpo": 0.04, "rloo": 0.05, "ppo": 0.1}
PRECISIONS = {"single": ["fp32", "bf16"], "zero3": ["fp32"], "zero3-lora": ["fp32"]}
"""bf16 autocast only in one process: it runs ~3x slower than fp32 on CPUs without bf16 units."""
CASES = [(a, p, setup, v) for (a, setup), providers in PROVIDERS.items() for p in PRECISIONS[setup] for v in providers]
REPRESENTATIVE = [("grpo", "fp32", "single", "ours"), ("grpo", "fp32", "single", "trl"),
                  ("ppo", "fp32", "single", "ours"), ("ppo", "fp32", "single", "hf")]
"""The cases of a run without --sweeps: ours against the baseline of GRPO and of PPO, fp32, one process."""
ROUNDS = 2
FAMILY = os.environ.get("BENCH_RLHF_FAMILY", "llama")
"""The model family of every case (rlhf_worker.py --family): llama, or qwen3 for a Qwen3 of the same sizes (q/k RMSNorm
per head), as in rlhf_qwen3.json:

    BENCH_RLHF_FAMILY=qwen3 pytest bench/bench_rlhf.py --benchmark-only \
        -k "grpo-fp32-single-ours] or grpo-fp32-single-trl]" --benchmark-json=bench/results/rlhf_qwen3.json
"""
SIZES = {"10M": (384, 6), "50M": (512, 16), "125M": (768, 18)}
"""The scaling runs' model sizes: (hidden, layers) of the demo Llama over the demo tokenizer's 246 tokens."""
PAIRS = {"grpo": ["ours", "trl"], "rloo": ["ours", "trl"], "ppo": ["ours", "hf"]}
"""Each algorithm's pair in the scaling runs: ours and its baseline in one process."""
LENGTHS = [32, 128, 512]
"""The scaling runs' response lengths (max new tokens; a response also ends at eos), at the smallest model."""
SCALING = ([(a, v, size, LENGTHS[0]) for size in SIZES for a, pair in PAIRS.items() for v in pair]
           + [(a, v, "10M", n) for n in LENGTHS[1:] for a in ("grpo", "ppo") for v in PAIRS[a]])
"""(algo, provider, size, max new tokens) of every scaling run: fp32, 3 steps, ROUNDS interleaved rounds (the faster
one reported; a 125M step takes ~10-40 s)."""
SCALING_STEPS = 3
BATCHES = [2, 8, 32]
"""The batch runs' prompts per step (x 4 samples: 8 to 128 rows), at the smallest model and 32 new tokens."""
BATCH = [(a, v, n) for n in BATCHES for a, pair in PAIRS.items() for v in pair]
"""(algo, provider, prompts per step) of every batch run: fp32, SCALING_STEPS steps, ROUNDS interleaved rounds (the
faster one reported), ours beside its baseline."""
CURVE_STEPS = 40
CURVE_LR = 1e-4
"""The reward-curve runs (test_rlhf_curve): each algorithm's pair at the default ~10M model, fp32, CURVE_STEPS
steps at CURVE_LR (DeepSpeed-Chat's ~1e-5 barely moves a random model's reward in 40 steps), so that equal
learning is seen over a curve and not only in a step's reward."""
CURVES = [(a, v) for a, pair in PAIRS.items() for v in pair]
CURVE_SEEDS = (0, 1, 2)
"""Every curve runs once per seed (the model's initialisation, the sampling and the prompts' order, the same seed on
both sides of a pair), so that a difference between the pair is weighed against the seeds' own spread."""


ROOFLINES: list = []
"""The roofline measured again after every case (harness.measure_roofline): a shared VM's slow spells lower some
measurements by a third, and the run's roofline is the best of them all (best_roofline)."""


def best_roofline(machine: dict) -> dict:
    """The machine's figures with the roofline fields replaced by the best of this run's measurements: the session's
    first (machine) and one after every case."""
    fields = {"read_GBps": ("read_bytes_per_s", 1e9), "matmul_GFLOPps": ("flops_per_s", 1e9),
              "matmul_bf16_GFLOPps": ("bf16_flops_per_s", 1e9)}
    best = {k: max([machine[k]] + [round(getattr(r, attr) / scale, 2) for r in ROOFLINES])
            for k, (attr, scale) in fields.items()}
    return {**machine, **best, "roofline_measurements": 1 + len(ROOFLINES)}


def baseline(algo: str, setup: str) -> str:
    """The provider a case's ratio is against: the one of its algorithm and setup that is not ours."""
    return next(v for v in PROVIDERS[(algo, setup)] if v in BASELINE)


def _figures(result: dict, machine: dict) -> dict:
    steps = result["steps"][1:] or result["steps"]  # the first step warms up (JIT, allocator, caches)
    step_s = statistics.median(s["time_s"] for s in steps)
    samples = result["settings"]["prompts"] * result["settings"]["generations"]
    tokens = statistics.median(s["completion_tokens"] for s in steps)
    out = {"step_s": round(step_s, 4), "samples_per_s": round(samples / step_s, 2),
           "generated_tokens_per_s": round(tokens / step_s, 1), "mean_response_tokens": round(tokens / samples, 1),
           "peak_rss_mb": round(result["peak_rss_mb"]),
           "params_M": round(result["params"] / 1e6, 2), "ranks": result.get("ranks", 1),
           "rewards": [round(s["reward"], 4) for s in result["steps"]]}
    for phase in PHASES:
        if phase in steps[0]:
            out[phase] = round(statistics.median(s[phase] for s in steps), 4)
    if all(phase in steps[0] for phase in PHASES):
        # Each step's wall time less its phases (the medians above are each phase's own and need not add up to
        # step_s): the work no phase timer covers, above 0 since the wall clock is measured apart from them.
        out["untimed_s"] = round(statistics.median(untimed_s(s) for s in steps), 4)
    if "shape" in result:
        out.update(_roofline(result, out, machine))
    return out


def _roofline(result: dict, figures: dict, machine: dict) -> dict:
    """Each phase's and the step's fraction of its roofline (hybrid_engine.benchmarks.rlhf_roofline), against the
    read bandwidth and matmul rate of this run (machine: best_roofline's): fp32's, or under bf16 autocast bf16's for
    scoring and training (the passes an algorithm may run in bf16 there; generation reads the fp32 weights)."""
    settings = result["settings"]
    work = phase_work(result["shape"], settings["algo"], settings["prompts"] * settings["generations"],
                      figures["mean_response_tokens"])
    times = {p: figures.get(f"{p}_s") for p in work} | {"step": figures["step_s"]}
    rate = machine["matmul_GFLOPps"] * 1e9
    autocast = machine["matmul_bf16_GFLOPps"] * 1e9 if settings["bf16"] else rate
    return roofline_fractions(times, work, machine["read_GBps"] * 1e9, rate, autocast)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_case(algo: str, precision: str, setup: str, provider: str, out: Path, extra: tuple = ()) -> dict:
    args = [str(WORKER), provider, algo, str(out), "--beta", str(BETA[algo]), "--family", FAMILY, *SETUPS[setup],
            *extra]
    if precision == "bf16":
        args.append("--bf16")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable]
    if SETUPS[setup]:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                     "--master_port", str(_port())]
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{algo} {precision} {setup} {provider} failed:\n{proc.stderr[-6000:]}")
    ROOFLINES.append(measure_roofline())
    return json.loads(out.read_text())


def _interleaved(cases: list, run: Callable[[tuple, int], dict]) -> dict:
    """Every case run ROUNDS times, the rounds interleaved (round 1 of every case, then round 2), so that slow spells
    of a shared machine fall on every provider alike; {case: [result of each round]}."""
    results: dict = {case: [] for case in cases}
    for r in range(ROUNDS):
        for case in cases:
            results[case].append(run(case, r))
    return results


def _best_round(runs: list[dict], machine: dict) -> dict:
    """The figures of the faster of a case's rounds, with every round's step time."""
    figures = [_figures(r, machine) for r in runs]
    best = min(range(len(runs)), key=lambda i: figures[i]["step_s"])
    return dict(settings=runs[best]["settings"], rounds=len(runs), step_s_rounds=[f["step_s"] for f in figures],
                **figures[best])


def _sized_case(algo: str, provider: str, out: Path, size: str, length: int, *more: str) -> dict:
    """One fp32 single-process run of the scaling and batch sets: the model of SIZES[size], `length` new tokens,
    SCALING_STEPS steps, and `more` worker arguments."""
    hidden, layers = SIZES[size]
    extra = ("--hidden", str(hidden), "--layers", str(layers), "--completion", str(length),
             "--steps", str(SCALING_STEPS), *more)
    return _run_case(algo, "fp32", "single", provider, out, extra)


@pytest.fixture(scope="session")
def rounds(request, tmp_path_factory, machine) -> dict:
    """Every selected case, ROUNDS interleaved rounds: {case: [result of each round]}."""
    cases = _selected(request, "test_rlhf_step", ("algo", "precision", "setup", "provider"), CASES)
    out = tmp_path_factory.mktemp("rlhf")
    return _interleaved(cases, lambda case, r: _run_case(*case, out / f"{'-'.join(case)}-{r}.json"))


def _selected(request, test: str, params: tuple, cases: list) -> list:
    """The cases of `test` that this session runs (-k), in the order of `cases`, less TRL's where trl is missing."""
    have_trl = importlib.util.find_spec("trl") is not None
    chosen = {tuple(item.callspec.params[k] for k in params)
              for item in request.session.items if getattr(item, "originalname", "") == test}
    return [c for c in cases if c in chosen and (have_trl or not any(str(v).startswith("trl") for v in c))]


@pytest.fixture(scope="session")
def scaling_runs(request, tmp_path_factory, machine) -> dict:
    """Every selected scaling run, ROUNDS interleaved rounds: {(algo, provider, size, length): [result of each
    round]}."""
    out = tmp_path_factory.mktemp("rlhf-scaling")

    def run(case: tuple, r: int) -> dict:
        algo, provider, size, length = case
        return _sized_case(algo, provider, out / f"{'-'.join(map(str, case))}-{r}.json", size, length)

    return _interleaved(_selected(request, "test_rlhf_scaling", ("algo", "provider", "size", "length"), SCALING), run)


@pytest.fixture(scope="session")
def batch_runs(request, tmp_path_factory, machine) -> dict:
    """Every selected batch run, ROUNDS interleaved rounds: {(algo, provider, prompts): [result of each round]}."""
    out = tmp_path_factory.mktemp("rlhf-batch")

    def run(case: tuple, r: int) -> dict:
        algo, provider, prompts = case
        return _sized_case(algo, provider, out / f"{'-'.join(map(str, case))}-{r}.json", "10M", LENGTHS[0],
                           "--prompts", str(prompts))

    return _interleaved(_selected(request, "test_rlhf_batch", ("algo", "provider", "prompts"), BATCH), run)


@pytest.fixture(scope="session")
def curve_runs(request, tmp_path_factory, machine) -> dict:
    """Every selected reward-curve run, once per seed, the seeds outermost: {(algo, provider): [result per seed]}."""
    out = tmp_path_factory.mktemp("rlhf-curves")
    cases = _selected(request, "test_rlhf_curve", ("algo", "provider"), CURVES)
    runs: dict = {case: [] for case in cases}
    for seed in CURVE_SEEDS:
        extra = ("--steps", str(CURVE_STEPS), "--lr", str(CURVE_LR), "--seed", str(seed))
        for algo, provider in cases:
            runs[(algo, provider)].append(_run_case(algo, "fp32", "single", provider,
                                                    out / f"{algo}-{provider}-{seed}.json", extra))
    return runs


@pytest.mark.sweep
@pytest.mark.parametrize("algo,provider", CURVES)
def test_rlhf_curve(benchmark, algo, provider, machine, curve_runs):
    """Equal learning: the reward at every one of CURVE_STEPS steps for each of CURVE_SEEDS, ours against the baseline
    of the algorithm, with the same settings, model and learning rate (one process, fp32). `rewards` is the seeds'
    mean at each step, `rewards_by_seed` each seed's; the speed figures are the first seed's."""
    if (algo, provider) not in curve_runs:
        pytest.skip("trl is not installed (pip install -e '.[dev]')")
    results, machine = curve_runs[(algo, provider)], best_roofline(machine)
    by_seed = [_figures(r, machine)["rewards"] for r in results]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are the worker's, below
    benchmark.extra_info.update(provider=provider, algo=algo, precision="fp32", setup="single",
                                baseline=PAIRS[algo][1], **machine, settings=results[0]["settings"], rounds=1,
                                **_figures(results[0], machine), seeds=list(CURVE_SEEDS), rewards_by_seed=by_seed)
    benchmark.extra_info["rewards"] = [round(statistics.mean(step), 4) for step in zip(*by_seed)]


@pytest.mark.sweep
@pytest.mark.parametrize("algo,provider,size,length", SCALING)
def test_rlhf_scaling(benchmark, algo, provider, size, length, machine, scaling_runs):
    """How each system's step grows with the model (10M to 125M parameters) and the response length (32 to 512
    new tokens): ours against the baseline of the algorithm, in one process, fp32."""
    if (algo, provider, size, length) not in scaling_runs:
        pytest.skip("trl is not installed (pip install -e '.[dev]')")
    runs, machine = scaling_runs[(algo, provider, size, length)], best_roofline(machine)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are the worker's, below
    benchmark.extra_info.update(provider=provider, algo=algo, precision="fp32", setup="single", size=size,
                                completion=length, baseline=PAIRS[algo][1], **machine, **_best_round(runs, machine))


@pytest.mark.sweep
@pytest.mark.parametrize("algo,provider,prompts", BATCH)
def test_rlhf_batch(benchmark, algo, provider, prompts, machine, batch_runs):
    """How each system's step grows with the batch (8 to 128 rows a step): ours against the baseline of the
    algorithm at the smallest model and 32 new tokens, in one process, fp32."""
    if (algo, provider, prompts) not in batch_runs:
        pytest.skip("trl is not installed (pip install -e '.[dev]')")
    runs, machine = batch_runs[(algo, provider, prompts)], best_roofline(machine)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are the worker's, below
    benchmark.extra_info.update(provider=provider, algo=algo, precision="fp32", setup="single", size="10M",
                                completion=LENGTHS[0], prompts=prompts, baseline=PAIRS[algo][1], **machine,
                                **_best_round(runs, machine))


@pytest.mark.parametrize("algo,precision,setup,provider", representative(CASES, *REPRESENTATIVE))
def test_rlhf_step(benchmark, algo, precision, setup, provider, machine, rounds):
    if (algo, precision, setup, provider) not in rounds:
        pytest.skip("trl is not installed (pip install -e '.[dev]')")
    runs, machine = rounds[(algo, precision, setup, provider)], best_roofline(machine)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are the worker's, below
    benchmark.extra_info.update(provider=provider, algo=algo, precision=precision, setup=setup,
                                baseline=baseline(algo, setup), **machine, **_best_round(runs, machine))
