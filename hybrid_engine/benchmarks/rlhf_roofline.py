"""The roofline of one RLHF step, phase by phase (issue 13): the work an algorithm needs, whoever runs it, as FLOPs
and bytes, and its time at the read bandwidth and matmul rate measured in the same run.

The work counted is the algorithm's, the same for every provider, so that a system doing more (an old-policy
recompute, logits over the whole vocabulary, padding) shows as a lower fraction rather than a higher roofline:
- generation: a forward of the actor over every prompt and response token, each decode step reading the actor's
  weights once (fp32) and the KV cache of every sequence so far;
- experience: a no-grad forward over the same tokens per scoring model: the reference (a KL coefficient above 0),
  and for PPO the critic (the rule score is the reward: no reward model);
- training: forward and backward (3 forwards' FLOPs) of the actor, and for PPO of the critic, ppo_epochs 1.
A forward costs 2 FLOPs per matmul weight per token plus causal attention's 2 * layers * hidden * T^2 per sequence
of T tokens. A phase's roofline time is the larger of its bytes over the read bandwidth and its FLOPs over the
matmul rate (fp32; under bf16 autocast, bf16's for scoring and training); the step's is the sum of its phases'.
"""

from __future__ import annotations

ADAMW_BYTES = 28
"""AdamW's traffic per fp32 weight: it reads the weight, its gradient and both moments, and writes three of them."""


def forward_flops(matmul_params: int, layers: int, hidden: int, sequences: int, tokens: float) -> float:
    """FLOPs of one forward over `sequences` sequences of `tokens` tokens each."""
    return sequences * (2 * matmul_params * tokens + 2 * layers * hidden * tokens**2)


def phase_work(shape: dict, algo: str, samples: int, response_tokens: float) -> dict:
    """{phase: (bytes, FLOPs)} of one step; shape: the worker's model shape (matmul_params, critic_params,
    layers, hidden, prompt_tokens: the mean prompt length)."""
    n, layers, hidden, prompt = shape["matmul_params"], shape["layers"], shape["hidden"], shape["prompt_tokens"]
    total = prompt + response_tokens
    actor = forward_flops(n, layers, hidden, samples, total)
    critic = forward_flops(shape["critic_params"], layers, hidden, samples, total)
    kv_bytes = 2 * layers * hidden * 4 * samples * (prompt * response_tokens + response_tokens**2 / 2)
    scorers = actor + (critic if algo == "ppo" else 0.0)
    trained = 3 * actor + (3 * critic if algo == "ppo" else 0.0)
    return {"generate": (4 * n * response_tokens + kv_bytes, actor), "experience": (4 * n, scorers),
            "train": (ADAMW_BYTES * (n + (shape["critic_params"] if algo == "ppo" else 0)), trained)}


def roofline_fractions(times: dict, work: dict, read_bps: float, flops_ps: float, autocast_flops_ps: float) -> dict:
    """{phase_roofline_fraction: roofline time over measured time} of each phase in `times` ({phase: s}, with
    "step" the whole step's), and the step's (the sum of the phases' roofline times over the step time).
    Generation's FLOPs go at flops_ps, scoring's and training's at autocast_flops_ps (the bf16 rate under bf16
    autocast, else flops_ps)."""
    def roof(phase):
        nbytes, flops = work[phase]
        return max(nbytes / read_bps, flops / (flops_ps if phase == "generate" else autocast_flops_ps))

    out = {f"{p}_roofline_fraction": round(roof(p) / times[p], 3) for p in work if times.get(p)}
    out["step_roofline_fraction"] = round(sum(roof(p) for p in work) / times["step"], 3)
    return out
