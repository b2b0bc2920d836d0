"""Run by torchrun (1 or 2 processes, gloo, CPU): the hybrid engine under DeepSpeed ZeRO 0, 2 and 3, with
and without LoRA, and tensor-parallel generation. Each rank writes what it measured to OUT/rank<r>.json;
tests/test_engine_distributed.py asserts on it."""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import peft
import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from models import VOCAB, left_padded_prompts, tiny_model, train_steps  # noqa: E402
from worker_exit import write_and_leave  # noqa: E402

import hybrid_engine  # noqa: E402
from hybrid_engine.engine import HybridEngine  # noqa: E402

STEPS, NEW = 2, 8
# every configuration runs the first family; the others a ZeRO-3 subset
FAMILIES = ["llama-gqa", "qwen3", "olmo2", "smollm3", "phi3", "gemma3", "qwen3-moe", "mixtral"]
# and a TP subset (OLMo 2's q/k norm over the whole projection refuses TP, MoE's experts are not sharded)
TP_FAMILIES = ["qwen3", "smollm3", "phi3", "gemma3"]
SOFTCAP = "gemma3-softcap"  # a family whose logits are transformed after the LM head: ZeRO-3 token_logprobs training
EOS = dict(eos_token_id=2, pad_token_id=0)  # the tiny Llama's own eos


def ds_config(stage: int, offload: bool = False) -> dict:
    # Tiny parameters would stay resident (persistent) and never really be gathered: force partitioning.
    # Small buckets: DeepSpeed's defaults reserve ~2 GB per engine.
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
            "reduce_bucket_size": 2**20, "allgather_bucket_size": 2**20, "stage3_prefetch_bucket_size": 2**20}
    config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": zero}
    if offload:  # DeepSpeed then insists on its own CPU Adam, from the config
        zero.update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2}}
    return config


def lora_config(family: str = "llama-gqa"):
    # Phi-3: fused projections; Mixtral: no down_proj module (its experts are 3-D parameters)
    targets = {"phi3": ["qkv_proj", "down_proj"], "mixtral": ["q_proj", "v_proj", "o_proj"]}.get(
        family, ["q_proj", "v_proj", "down_proj"])
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)


def engine(stage: int, lora: bool, offload: bool = False, family: str = "llama-gqa", **generation) -> HybridEngine:
    torch.manual_seed(0)  # the same adapters on every rank
    model = copy.deepcopy(tiny_model(family))
    optimizer = None if offload else (lambda p: torch.optim.AdamW(p, lr=1e-2))
    return HybridEngine(model, ds_config=ds_config(stage, offload), lora=lora_config(family) if lora else None,
                        optimizer=optimizer, generation=generation or None)


def batch(step: int):
    ids, mask = left_padded_prompts([7, 4, 6], seed=100 * dist.get_rank() + step)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def train(eng: HybridEngine, steps: range) -> list[float]:
    return train_steps(eng, (batch(step)[:2] for step in steps))


def prompts():
    return left_padded_prompts([5, 8, 3], seed=7 + dist.get_rank())


def shared_tmpdir() -> str:
    path = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    return path[0]


def live_tensor_bytes() -> int:
    """Bytes of the CPU tensors still reachable; garbage in reference cycles is collected first, else a collection
    that happens to run inside generation mode makes the mode look as if it freed memory."""
    import gc

    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def check(stage: int, lora: bool, gather: str, offload: bool = False, family: str = "llama-gqa") -> dict:
    ids, mask = prompts()
    a = engine(stage, lora, offload, family, gather=gather)
    losses_a = train(a, range(STEPS))
    before = live_tensor_bytes()
    with a.generation_mode():
        a.generate(ids, mask, max_new_tokens=NEW, **EOS)
        during = live_tensor_bytes()
    after = live_tensor_bytes()
    switch = a.stats.as_dict()
    losses_a += train(a, range(STEPS, 2 * STEPS))
    b = engine(stage, lora, offload, family, gather=gather)
    losses_b = train(b, range(2 * STEPS))

    # An eos id that certainly fires mid-batch: the token row 0 generates third.
    third = a.generate(ids, mask, max_new_tokens=3, eos_token_id=None).sequences[0, -1]  # no eos: 3 tokens
    eos = dict(eos_token_id=int(third), pad_token_id=0)
    out = a.generate(ids, mask, max_new_tokens=NEW, **eos)
    parity = a.logprob_mismatch(out, mask)
    a.eval()
    hybrid_engine.apply_hybrid_engine(a.module)  # HF's own generate on the (ZeRO-3) module, served fast
    patched = a.module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **eos)
    fallbacks = a.module.generate.fallbacks
    hybrid_engine.engine.patch.unapply_hybrid_engine(a.module)
    directory = shared_tmpdir()
    a.save_pretrained(directory)
    plain = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    hf = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **eos)
    ours_plain = hybrid_engine.generate(plain, ids, mask, max_new_tokens=NEW, **eos)
    return dict(
        losses_with_generation=losses_a, losses_without=losses_b, parity=parity, switch=switch,
        live_bytes=[before, during, after],
        engine_equals_hf=torch.equal(out.sequences, hf),
        eos_fired=bool((out.response_mask == 0).any()),
        reloaded_equals_engine=torch.equal(ours_plain.sequences, out.sequences),
        patched_equals_engine=torch.equal(patched, out.sequences) and fallbacks == 0,
    )


def logprob_training(stage: int, lora: bool, fused: bool, family: str = "llama-gqa") -> list[float]:
    """Losses of 3 steps of -mean log p(response) through engine.token_logprobs (fused) or HF logits."""
    eng, start, losses = engine(stage, lora, family=family), 3, []
    for step in range(3):
        ids, mask, _ = batch(step)
        if fused:
            lp = eng.token_logprobs(ids, mask, start)
        else:
            logits = eng(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
            lp = logits[:, start - 1 : -1].log_softmax(-1).gather(-1, ids[:, start:, None])[..., 0] * mask[:, start:]
        loss = -lp.sum() / mask[:, start:].sum()
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    return losses


def grouped_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, start): 3 left-padded prompts repeated 2, 1 and 2 times (GRPO's samples of a
    prompt), each row followed by 4 response tokens of its own."""
    ids, mask, _ = batch(step)
    owner = torch.tensor([0, 0, 1, 2, 2])
    g = torch.Generator().manual_seed(100 * dist.get_rank() + step)
    response = torch.randint(2, VOCAB, (5, 4), generator=g)
    return torch.cat([ids[owner], response], 1), torch.cat([mask[owner], torch.ones_like(response)], 1), ids.shape[1]


def mixed_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """grouped_batch's rows on rank 0; on the other ranks, no two neighbouring rows share a prompt (their last
    prompt token differs), so only rank 0 has a prompt to run once."""
    ids, mask, start = grouped_batch(step)
    if dist.get_rank() != 0:
        ids = ids.clone()
        ids[:, start - 2] = torch.arange(2, 2 + ids.shape[0])
    return ids, mask, start


def shared_prefix_training(stage: int, lora: bool, share: bool, rows=grouped_batch) -> list[float]:
    """Losses of 3 steps of -mean log p(response) on `rows` (grouped_batch), their prompts run once (share) or
    not."""
    eng, losses = engine(stage, lora), []
    for step in range(3):
        ids, mask, start = rows(step)
        lp = eng.token_logprobs(ids, mask, start, share_prefix=share)
        loss = -lp.sum() / mask[:, start:].sum()
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    return losses


def check_tp(lora: bool, gather: str, family: str = "llama-gqa") -> dict:
    ids, mask = prompts()
    one = engine(3, lora, family=family).generate(ids, mask, max_new_tokens=NEW, **EOS)
    tp = engine(3, lora, family=family, inference_tp_size=2, gather=gather)
    two = tp.generate(ids, mask, max_new_tokens=NEW, **EOS)
    diff = float((one.logprobs - two.logprobs).abs().max())
    return dict(equal=torch.equal(one.sequences, two.sequences), logprob_diff=diff, switch=tp.stats.as_dict())


def main(out_dir: str) -> None:
    # saved and reloaded per process before torch.distributed starts (HF saves on rank 0 only)
    for family in [*FAMILIES, SOFTCAP]:
        tiny_model(family)
    hybrid_engine.engine.training.init_distributed()
    results = {}
    for stage in (0, 2, 3):
        for lora in (False, True):
            for gather in ("all", "layer") if stage == 3 else ("all",):
                results[f"zero{stage}-{'lora' if lora else 'full'}-{gather}"] = check(stage, lora, gather)
    for lora in (False, True):  # gradients through the fused op under ZeRO-3 (partitioned LM head)
        results[f"zero3-{'lora' if lora else 'full'}-token-logprobs-training"] = dict(
            fused=logprob_training(3, lora, True), logits=logprob_training(3, lora, False))
    for stage in (2, 3):  # a shared prompt's two passes under ZeRO (the second forward re-gathers under stage 3)
        for lora in (False, True):
            results[f"zero{stage}-{'lora' if lora else 'full'}-shared-prefix-training"] = dict(
                shared=shared_prefix_training(stage, lora, True), one_pass=shared_prefix_training(stage, lora, False))
    if dist.get_world_size() == 2:  # one rank with a prompt to run once, one without: the ranks' gathers must match
        results["zero3-full-mixed-shared-prefix-training"] = dict(
            shared=shared_prefix_training(3, False, True, mixed_batch),
            one_pass=shared_prefix_training(3, False, False, mixed_batch))
    # The other families: ZeRO-3 with LoRA and layer-by-layer gathering, across 2 ranks (their full training and
    # whole-model gathering are the Llama's code paths, and one-process runs of each family are test_engine.py's).
    if dist.get_world_size() == 2:
        for family in FAMILIES[1:]:
            results[f"{family}-zero3-lora-layer"] = check(3, True, "layer", family=family)
        # logits soft-capped after the LM head: token_logprobs reads the HF forward's logits (a partitioned head)
        results[f"{SOFTCAP}-zero3-lora-token-logprobs-training"] = dict(
            fused=logprob_training(3, True, True, SOFTCAP), logits=logprob_training(3, True, False, SOFTCAP))
    if dist.get_world_size() == 1:  # offload needs DeepSpeed's CPU Adam (built on first use)
        results["zero3-offload-full-all"] = check(3, False, "all", offload=True)
    if dist.get_world_size() == 2:
        for lora in (False, True):
            for gather in ("all", "layer"):
                results[f"tp2-{'lora' if lora else 'full'}-{gather}"] = check_tp(lora, gather)
        for family in TP_FAMILIES:
            results[f"{family}-tp2-lora-layer"] = check_tp(True, "layer", family)
    write_and_leave(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), results)


if __name__ == "__main__":
    main(sys.argv[1])
