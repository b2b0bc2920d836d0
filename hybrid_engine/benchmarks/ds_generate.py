"""DeepSpeed without a hybrid engine (issue 13's baseline): a HybridEngine whose generate() is HF `generate` on the
DeepSpeed module itself (ZeRO-3 hooks fetch every partitioned weight at every decode step; with LoRA, peft's
unmerged adapters run too), everything else unchanged. train_ppo given this actor does the same scoring and
training as with ours, so a step-time ratio is what the engine's generation mode buys a DeepSpeed user.

It returns hybrid_engine's GenerationOutput: the sampled tokens, their log-probs at the sampling temperature (from
the logits HF returns, the old log-probs PPO uses), and the response mask (1 up to and including the first eos).
"""

from __future__ import annotations

import torch
import transformers

from hybrid_engine.benchmarks.hf_ppo import response_mask  # the HF baseline's mask: both HF-generate actors cut alike
from hybrid_engine.engine import HybridEngine
from hybrid_engine.generation import GenerationOutput, SamplingParams


def sampled_logprobs(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, temperature: float,
                     mask: torch.Tensor) -> torch.Tensor:
    """fp32 [B, n]: log-softmax(logits / temperature) at each sampled token, 0 where masked out."""
    stacked = torch.stack(logits, 1).float() / temperature  # [B, n, V]
    picked = torch.log_softmax(stacked, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked * mask


class HFGenerateEngine(HybridEngine):
    """A HybridEngine that generates with HF `generate` on its (DeepSpeed, maybe peft) module."""

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 sampling: SamplingParams | None = None, **overrides) -> GenerationOutput:
        """HybridEngine.generate's arguments; HF samples from torch's global generator (a seed or generator given
        here is not used)."""
        s = SamplingParams.of(sampling, overrides)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        config = transformers.GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                                               temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                               eos_token_id=s.eos_token_id, pad_token_id=s.pad_token_id,
                                               return_dict_in_generate=True, output_logits=True)
        module = self.module
        was_training = module.training
        module.eval()
        try:
            out = module.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                  synced_gpus=torch.distributed.is_initialized())
        finally:
            module.train(was_training)
        tokens = out.sequences[:, input_ids.shape[1]:]
        mask = response_mask(tokens, s.eos_token_id)
        self.stats.generated_tokens += int(mask.sum())
        return GenerationOutput(sequences=out.sequences, logprobs=sampled_logprobs(out.logits, tokens, s.temperature,
                                                                                   mask), response_mask=mask)
