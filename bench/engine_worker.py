"""One PPO-shaped step per provider on a ~125M Llama under DeepSpeed ZeRO-3 (started by torchrun; one
thread per rank): generate NEW tokens for BATCH prompts per rank, then one training step on the result.
Each rank writes its figures to OUT/rank<r>.json; bench_engine.py reads them.

Providers (generation phase):
- ours: engine.generate, switch in and out included (gather, LoRA fuse, build, release);
- ours-bf16: the same with bf16 generation weights;
- single: hybrid_engine.generate on a plain (merged) copy of the same weights, no DeepSpeed, same batch;
- hf-gathered: HF generate inside a manual GatheredParameters of the whole model;
- hf-zero3: HF generate on the DeepSpeed engine's module, ZeRO-3 hooks firing at every step.
Training phase: train-ours (engine.token_logprobs, the fused op) and train-ds (HF logits + log_softmax),
each a forward, backward and optimizer step of DeepSpeed on the same generated batch.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import hybrid_engine
from hybrid_engine.engine.lora import base_model
from hybrid_engine.engine.save import merged_model
from hybrid_engine.engine.zero import gathered, unique_params
from hybrid_engine.model.presets import preset_model

PROMPT, NEW, BATCH = int(os.environ.get("BENCH_PROMPT", 64)), int(os.environ.get("BENCH_NEW", 128)), \
    int(os.environ.get("BENCH_BATCH", 16))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def engine(lora: bool, live: int | None):
    import peft

    zero = {"stage": 3, "reduce_bucket_size": 2**24, "allgather_bucket_size": 2**24}
    if live is not None:  # small enough that the parameters cannot stay resident: the gather is real
        zero.update(stage3_max_live_parameters=live, stage3_prefetch_bucket_size=0,
                    stage3_param_persistence_threshold=0)
    config = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": zero}
    lora_config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]) if lora else None
    return hybrid_engine.HybridEngine(preset_model(os.environ.get("BENCH_MODEL", "llama-125m")), ds_config=config,
                                      lora=lora_config, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6))


def prompts(vocab: int):
    g = torch.Generator().manual_seed(dist.get_rank())
    return torch.randint(3, vocab, (BATCH, PROMPT), generator=g), torch.ones(BATCH, PROMPT, dtype=torch.long)


def timed(fn):
    dist.barrier()
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, {"seconds": seconds, "peak_MB": peak_mb()}


HF = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, synced_gpus=True)


def generation(eng, provider: str, ids, mask) -> dict:
    module = eng.module
    if provider in ("ours", "ours-bf16", "ours-layer"):
        eng.settings.weight_dtype = torch.bfloat16 if provider == "ours-bf16" else None
        eng.settings.gather = "layer" if provider == "ours-layer" else "all"
        out, r = timed(lambda: eng.generate(ids, mask, max_new_tokens=NEW, eos_token_id=None))
        r.update(switch=eng.stats.as_dict())
        eng.settings.weight_dtype, eng.settings.gather = None, "all"
        return dict(r, tokens=int(out.response_mask.sum()))
    if provider == "single":
        with gathered(unique_params([module])):
            plain = merged_model(base_model(module))
        out, r = timed(lambda: hybrid_engine.generate(plain, ids, mask, max_new_tokens=NEW, eos_token_id=None))
        return dict(r, tokens=int(out.response_mask.sum()))
    if provider == "hf-gathered":
        def run():
            with gathered(unique_params([module])):
                return module.generate(input_ids=ids, attention_mask=mask, **HF)
    else:
        def run():
            return module.generate(input_ids=ids, attention_mask=mask, **HF)
    module.eval()
    with torch.no_grad():
        out, r = timed(run)
    module.train()
    return dict(r, tokens=int(out.shape[1] - ids.shape[1]) * ids.shape[0])


def training(eng, provider: str, sequences: torch.Tensor) -> dict:
    mask = torch.ones_like(sequences)
    advantages = torch.linspace(-1, 1, NEW).expand(sequences.shape[0], NEW)

    def step():
        if provider == "train-ours":
            lp = eng.token_logprobs(sequences, mask, PROMPT)
        else:  # what a DeepSpeed user writes: logits of every position, then log_softmax and gather
            logits = eng(input_ids=sequences, attention_mask=mask).logits[:, PROMPT - 1 : -1]
            lp = logits.float().log_softmax(-1).gather(-1, sequences[:, PROMPT:, None])[..., 0]
        loss = -(lp * advantages).mean()
        eng.backward(loss)
        eng.step()

    _, r = timed(step)
    return r


def main(out_dir: str, lora: bool, live: int | None, providers: list[str]) -> None:
    torch.set_num_threads(1)
    eng = engine(lora, live)
    ids, mask = prompts(eng.spec.vocab_size)
    sequences = eng.generate(ids, mask, max_new_tokens=NEW, eos_token_id=None).sequences  # warm-up, training batch
    # A first training step allocates the optimizer state and lets ZeRO-3 trace the module order: keep it
    # out of both training providers.
    training(eng, "train-ds", sequences)
    results: dict[str, dict] = {}
    gen = [p for p in providers if not p.startswith("train")]
    train = [p for p in providers if p.startswith("train")]
    # Two interleaved rounds, best of two: one thread per rank on 2 shared cores varies by ~15% run to run.
    for provider in gen * 2 + train * 2:
        r = training(eng, provider, sequences) if provider in train else generation(eng, provider, ids, mask)
        if provider not in results or r["seconds"] < results[provider]["seconds"]:
            results[provider] = r
        print(f"rank {dist.get_rank()} {provider}: {r['seconds']:.2f} s", flush=True)
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    out, lora, live, providers = sys.argv[1], sys.argv[2] == "lora", sys.argv[3], sys.argv[4].split(",")
    main(out, lora, None if live == "default" else int(live), providers)
