"""The built-in demo task: a small preference a few-M-parameter model learns on a CPU in minutes.

Prompts are short requests over a few hundred words ("describe the weather in paris today", "tell me
about a fox"); responses are 8-16 word sentences about the topic, with two to five sentiment words in
adjective slots ("the fox seems gloomy so the eyes felt warm and lovely"). The hidden preference is
positivity: `rule_score` is the fraction of the completion's sentiment words that are positive.

- `sft.jsonl` (prompt, response): each sentiment slot positive with probability 0.35, so the SFT
  policy starts mixed, with a mean rule score near 0.35.
- `reward.jsonl` (prompt, chosen, rejected): two responses to one prompt, slots positive with
  probability 0.5 each, the higher-scoring one chosen; ties are never kept.
- `ppo.jsonl` (prompt): distinct prompts; DataConfig.eval_fraction holds some out for evaluation.

No model sees `rule_score`: the reward model learns the preference from the pairs, and the rule's
score on held-out prompts tells whether PPO really improved the policy. The files and the tokenizer
beside them are written by `scripts/make_demo_data.py`, byte for byte the same on every run.
"""

from __future__ import annotations

import re
from pathlib import Path

from hybrid_engine.rlhf.data import WHOLE_FILE, DataConfig, DatasetSpec

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
"""The demo's folder: sft.jsonl, reward.jsonl, ppo.jsonl and the tokenizer files."""

POSITIVE = (
    "amazing", "beautiful", "bright", "brilliant", "calm", "charming", "cheerful", "cozy", "delightful",
    "excellent", "fantastic", "fresh", "friendly", "gentle", "glorious", "graceful", "great", "happy",
    "joyful", "kind", "lively", "lovely", "peaceful", "pleasant", "radiant", "splendid", "superb", "sweet",
    "warm", "wonderful",
)
NEGATIVE = (
    "awful", "bitter", "bland", "boring", "broken", "cold", "dirty", "dreadful", "dreary", "dull", "gloomy",
    "gray", "grim", "grumpy", "harsh", "horrible", "messy", "miserable", "nasty", "noisy", "poor", "rude",
    "sad", "soggy", "stale", "terrible", "tired", "ugly", "unpleasant", "weak",
)
_POSITIVE = frozenset(POSITIVE)
_NEGATIVE = frozenset(NEGATIVE)
_WORD = re.compile(r"[a-z]+")

DEMO_MODEL = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
"""The demo's Llama (about 2.7M parameters) as transformers.LlamaConfig keyword arguments; demo_model adds the
vocabulary size and the special token ids from the demo tokenizer."""

# How much of each file the demo holds out for evaluation, per step (PPO: 200 of 1200 prompts).
EVAL_FRACTION = {"sft": 0.1, "reward": 0.1, "ppo": 1 / 6}


def rule_score(prompt: str, completion: str) -> float:
    """The demo's hidden preference, in [0, 1]: positive / (positive + negative) sentiment words.

    Words are the lower-cased runs of letters of `completion`; a completion with no sentiment word
    scores 0. The prompt does not enter this rule; it is an argument so that a task's rule may use it.
    """
    words = _WORD.findall(completion.lower())
    positive = sum(w in _POSITIVE for w in words)
    negative = sum(w in _NEGATIVE for w in words)
    return positive / (positive + negative) if positive + negative else 0.0


def demo_config(step: str, seed: int = 1234, cache_dir: str | None = None) -> DataConfig:
    """The DataConfig that feeds step `step` ("sft", "reward" or "ppo") from its demo file, made for that step
    and so wholly its own."""
    if step not in WHOLE_FILE:
        raise ValueError(f"step must be one of {tuple(WHOLE_FILE)}, got {step!r}")
    spec = DatasetSpec(path=str(DEMO_DIR / f"{step}.jsonl"), data_split=WHOLE_FILE[step])
    return DataConfig(datasets=[spec], eval_fraction=EVAL_FRACTION[step], seed=seed, cache_dir=cache_dir)


def demo_tokenizer():
    """The demo's tokenizer, loaded with transformers.AutoTokenizer from DEMO_DIR (no hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_DIR))


def demo_model(seed: int = 0):
    """A fresh random transformers.LlamaForCausalLM of DEMO_MODEL's shape over the demo tokenizer's vocabulary,
    its weights drawn after torch.manual_seed(seed)."""
    import torch
    import transformers

    tok = demo_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, **DEMO_MODEL)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def rule_score_batch(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """rule_score of each (prompt, completion), in the reward-function form PPO's reward_fn and eval_fn take."""
    return [rule_score(p, c) for p, c in zip(prompts, completions)]
