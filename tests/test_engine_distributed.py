"""The hybrid engine under DeepSpeed ZeRO 0, 2 and 3 (with and without LoRA) in 1 and 2 processes started by
torchrun (gloo, CPU, one thread each), and tensor-parallel generation in 2. The worker (engine_worker.py)
runs every configuration once per launch; the tests below assert on what each rank measured."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("engine_worker.py")
CONFIGS = ["zero0-full-all", "zero0-lora-all", "zero2-full-all", "zero2-lora-all", "zero3-full-all",
           "zero3-full-layer", "zero3-lora-all", "zero3-lora-layer", "qwen3-zero3-lora-layer", "olmo2-zero3-lora-layer",
           "smollm3-zero3-lora-layer", "phi3-zero3-lora-layer", "gemma3-zero3-lora-layer", "qwen3-moe-zero3-lora-layer",
           "mixtral-zero3-lora-layer"]
"""The Llama's configurations run in both launches; the other families' (the last seven) in the two-process one."""
OFFLOAD = "zero3-offload-full-all"  # optimizer and parameters offloaded to the CPU; one process
TP_CONFIGS = ["tp2-full-all", "tp2-full-layer", "tp2-lora-all", "tp2-lora-layer", "qwen3-tp2-lora-layer",
              "smollm3-tp2-lora-layer", "phi3-tp2-lora-layer", "gemma3-tp2-lora-layer"]


def _launch(nproc: int, out: Path) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun --nproc_per_node {nproc} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def ranks(request, tmp_path_factory) -> list[dict]:
    return _launch(request.param, tmp_path_factory.mktemp(f"engine{request.param}"))


def measured(ranks: list[dict], config: str) -> list[dict]:
    """The ranks' results of `config`; skipped where this launch does not run it (the other families: 1 process)."""
    if config not in ranks[0]:
        pytest.skip(f"{config} runs in the two-process launch")
    return ranks


@pytest.mark.parametrize("config", CONFIGS)
def test_generate_equals_hf_of_the_merged_saved_model(ranks, config):
    for r in measured(ranks, config):
        assert r[config]["engine_equals_hf"], "engine.generate != HF generate of the save_pretrained model"
        assert r[config]["reloaded_equals_engine"], "hybrid_engine.generate of the reloaded model differs"
        assert r[config]["patched_equals_engine"], "apply_hybrid_engine on the engine's module differs or fell back"
    assert any(r[config]["eos_fired"] for r in ranks), "the test should end some sequence early at eos"


@pytest.mark.parametrize("config", CONFIGS)
def test_training_after_generation_is_bit_identical(ranks, config):
    for r in measured(ranks, config):
        assert r[config]["losses_with_generation"] == r[config]["losses_without"]


@pytest.mark.parametrize("config", CONFIGS)
def test_generation_logprobs_equal_training_logprobs(ranks, config):
    for r in measured(ranks, config):
        assert r[config]["parity"]["max"] <= 1e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_generation_mode_returns_its_memory(ranks, config):
    for r in measured(ranks, config):
        before, during, after = r[config]["live_bytes"]
        assert during > before, "generation mode should hold a KV cache at least"
        assert abs(after - before) <= 0.1 * before


def test_offload_generates_exactly_and_trains_on(ranks):
    if len(ranks) > 1:
        pytest.skip("the offload configuration runs in the one-process launch")
    r = ranks[0][OFFLOAD]
    assert r["engine_equals_hf"] and r["reloaded_equals_engine"] and r["eos_fired"]
    assert r["losses_with_generation"] == r["losses_without"]
    assert r["parity"]["max"] <= 1e-5


@pytest.mark.parametrize("config", ["zero3-full-token-logprobs-training", "zero3-lora-token-logprobs-training",
                                    "gemma3-softcap-zero3-lora-token-logprobs-training"])
def test_token_logprobs_trains_like_hf_logits_under_zero3(ranks, config):
    for r in measured(ranks, config):
        fused, logits = r[config]["fused"], r[config]["logits"]
        assert max(abs(a - b) for a, b in zip(fused, logits)) <= 1e-5, (fused, logits)


@pytest.mark.parametrize("config", ["zero2-full-shared-prefix-training", "zero2-lora-shared-prefix-training",
                                    "zero3-full-shared-prefix-training", "zero3-lora-shared-prefix-training"])
def test_a_shared_prompt_run_once_trains_like_one_pass_under_zero(ranks, config):
    for r in ranks:
        shared, one_pass = r[config]["shared"], r[config]["one_pass"]
        assert max(abs(a - b) for a, b in zip(shared, one_pass)) <= 1e-5, (shared, one_pass)
        assert len(set(shared)) == 3  # the steps trained: each step's loss differs


def test_ranks_that_differ_in_shared_prompts_agree_under_zero3(ranks):
    """Rank 0's rows share prompts, rank 1's do not: under ZeRO-3 both take one path (each forward gathers every
    layer, so a second forward on one rank alone would wait forever), and it trains like one pass."""
    config = "zero3-full-mixed-shared-prefix-training"
    for r in measured(ranks, config):
        shared, one_pass = (r[config][k] for k in ("shared", "one_pass"))
        assert max(abs(a - b) for a, b in zip(shared, one_pass)) <= 1e-5, (shared, one_pass)


def test_zero3_really_gathers(ranks):
    for r in ranks:
        assert r["zero3-full-all"]["switch"]["gather_bytes"] > 0
        assert r["zero0-full-all"]["switch"]["gather_bytes"] == 0


def test_zero_0_2_generation_reads_views_of_the_parameters(ranks):
    for r in ranks:
        assert r["zero0-full-all"]["switch"]["copied_bytes"] == 0
        assert r["zero2-full-all"]["switch"]["copied_bytes"] == 0


@pytest.mark.parametrize("config", TP_CONFIGS)
def test_tp2_generates_the_tokens_of_tp1(ranks, config):
    if len(ranks) < 2:
        pytest.skip("tensor parallelism needs 2 processes")
    for r in ranks:
        assert r[config]["equal"]
        assert r[config]["logprob_diff"] <= 1e-5
        assert r[config]["switch"]["reshard_bytes"] > 0
