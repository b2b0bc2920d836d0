"""One rank of a PPO run under DeepSpeed ZeRO-3 for bench_frozen.py, with the frozen reference and reward model
partitioned across the ranks or whole on each (PPOConfig.partition_frozen), writing this rank's memory figures.

    python -m torch.distributed.run --nproc_per_node 2 bench/frozen_worker.py MODE OUT_DIR [--hidden H --layers L]
        [--no-keep-freed-memory]

MODE: partitioned or whole. --no-keep-freed-memory: PPOConfig.keep_freed_memory=False (malloc's default, which gives
large freed blocks back to the OS), so that the resident size follows what is live instead of staying at its peak.
The actor, critic, reference and reward model are the same random Llama (hidden H, L layers, over the demo
tokenizer), rewarded by the reward model alone; 2 steps of 2 prompts per rank, 16 new tokens.

Figures, per rank (OUT_DIR/MODE-rank<r>.json):
- frozen_bytes: the bytes of the frozen models' parameters this rank holds (engine/frozen.resident_bytes), and
  whole_bytes, what a whole copy of both holds;
- gather_bytes: the most a partitioned frozen model gathers at once while scoring (the rule of engine/frozen.py: its
  embeddings, final norm and LM head, and two blocks), computed from its parameters' sizes;
- build_rss_mb: the process's resident memory (VmRSS) once the models are built, before any step (freed pages handed
  back to the OS: malloc_trim);
- rss_mb: the same after the first step;
- step_peak_rss_mb: the process's peak resident memory (VmHWM) during the second step alone (the peak is reset
  after the first through /proc/self/clear_refs), the step's phases' times.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from hybrid_engine.allocator import release_freed_memory
from hybrid_engine.engine.frozen import resident_bytes
from hybrid_engine.engine.training import init_distributed
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.weights import decoder_layers, top_modules
from hybrid_engine.rlhf import RewardModel
from hybrid_engine.rlhf.data import StepData, load_step_data
from hybrid_engine.rlhf.demo import demo_config, demo_tokenizer
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.ppo.models import build_models

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 2**22,
                               "allgather_bucket_size": 2**22, "stage3_prefetch_bucket_size": 2**22}}
"""Every parameter partitioned (DeepSpeed's default threshold keeps small ones whole); buckets below DeepSpeed's
defaults, which reserve ~2 GB per engine."""


def proc_status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Resets VmHWM to the current VmRSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def llama(hidden: int, layers: int) -> transformers.LlamaForCausalLM:
    tok = demo_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def numel(p: torch.nn.Parameter) -> int:
    """A parameter's elements, whole (ZeRO-3's ds_numel where it is partitioned)."""
    return getattr(p, "ds_numel", p.numel())


def gather_bytes(lm) -> int:
    """engine/frozen.py's rule for one frozen model: its top modules whole and two of its largest blocks."""
    spec = spec_from_config(lm.model.config if hasattr(lm, "model") else lm.config)

    def size(module) -> int:
        return sum(numel(p) * p.element_size() for p in module.parameters())

    return sum(size(m) for m in top_modules(lm, spec)) + 2 * max(size(m) for m in decoder_layers(lm, spec))


def main(mode: str, out: Path, hidden: int, layers: int, keep_freed: bool) -> None:
    init_distributed()
    rank = dist.get_rank()
    tok = demo_tokenizer()
    full = load_step_data(demo_config("ppo", cache_dir=str(out / f"cache{rank}")), "ppo")
    data = StepData(train=full.train.select(range(8)), eval=full.eval.select(range(2)), reports=full.reports)
    config = PPOConfig(max_steps=2, batch_size=2, train_batch_size=2, max_new_tokens=16, log_samples=0,
                       eval_batch_size=2, partition_frozen=mode == "partitioned", keep_freed_memory=keep_freed)
    # No reference to the sources is kept: the reward model given is copied (frozen, critic), and only the copies live.
    models = build_models(ModelSources(actor=llama(hidden, layers),
                                       reward_model=RewardModel.from_model(llama(hidden, layers)), ds_config=ZERO3),
                          config, tok)
    gc.collect()
    release_freed_memory()
    build_rss_mb = proc_status_mb("VmRSS")
    frozen = [models.reference.model, models.reward.model]
    record = {"mode": mode, "keep_freed_memory": keep_freed, "rank": rank, "world": dist.get_world_size(),
              "hidden": hidden, "layers": layers, "build_rss_mb": build_rss_mb,
              "params": sum(numel(p) for p in frozen[0].parameters()),
              "frozen_bytes": sum(resident_bytes(m) for m in frozen),
              "whole_bytes": sum(numel(p) * p.element_size() for m in frozen for p in m.parameters())}
    if mode == "partitioned":
        body = models.reward.causal_lm()
        record["gather_bytes"] = max(gather_bytes(models.reference.model), gather_bytes(body))

    def log(step: int, figures: dict) -> None:
        if "experience_s" not in figures:
            return
        if step == 1:
            gc.collect()
            record["rss_mb"] = proc_status_mb("VmRSS")
            reset_peak_rss()
        else:
            record["step_peak_rss_mb"] = proc_status_mb("VmHWM")
            record.update({k: figures[k] for k in ("generate_s", "experience_s", "train_s")})

    train_ppo(models, tok, data, config, progress=False, log=log)
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["partitioned", "whole"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    main(args.mode, args.out, args.hidden, args.layers, args.keep_freed_memory)
