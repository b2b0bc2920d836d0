"""hybrid_engine.benchmarks.rlhf_roofline, the work model of an RLHF step, against torch's own FLOP count of a real
forward. The worker's step times and phases are tested in test_step_clock.py."""

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from hybrid_engine.benchmarks import rlhf_roofline as roofline


@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_forward_flops_match_torchs_count(tokens):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    matmuls = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, 96, (3, tokens)))
    # Eager attention multiplies the whole T x T score matrix; the model counts only its causal half.
    masked_half = 3 * 2 * 2 * 64 * tokens**2
    expected = roofline.forward_flops(matmuls, 2, 64, 3, tokens) + masked_half
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-6)


def test_fractions_are_roofline_time_over_measured_time():
    work = {"generate": (10e9, 1e9), "experience": (1e9, 100e9), "train": (1e9, 300e9)}
    times = {"generate": 1.0, "experience": 1.0, "train": 3.0, "step": 5.0}
    got = roofline.roofline_fractions(times, work, read_bps=20e9, flops_ps=100e9, autocast_flops_ps=200e9)
    assert got == {"generate_roofline_fraction": 0.5, "experience_roofline_fraction": 0.5,
                   "train_roofline_fraction": 0.5, "step_roofline_fraction": 0.5}


def test_ppo_adds_the_critic_to_scoring_and_training():
    shape = {"matmul_params": 1000, "critic_params": 900, "layers": 2, "hidden": 8, "prompt_tokens": 4}
    grpo, ppo = (roofline.phase_work(shape, algo, samples=2, response_tokens=6) for algo in ("grpo", "ppo"))
    critic = roofline.forward_flops(900, 2, 8, 2, 10)
    assert ppo["generate"] == grpo["generate"]
    assert ppo["experience"][1] == pytest.approx(grpo["experience"][1] + critic)
    assert ppo["train"][1] == pytest.approx(grpo["train"][1] + 3 * critic)

