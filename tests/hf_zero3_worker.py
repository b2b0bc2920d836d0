"""Run by torchrun (2 processes, gloo, CPU): the HF path under DeepSpeed ZeRO-3 with LoRA, on a GPT-NeoX (no fast
path). Each rank writes what it measured to OUT/rank<r>.json; tests/test_hf_path.py asserts on it."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from engine_worker import ds_config, prompts, shared_tmpdir  # noqa: E402
from hf_families import family_model  # noqa: E402
from models import train_steps  # noqa: E402
from test_hf_path import lora  # noqa: E402
from worker_exit import write_and_leave  # noqa: E402

import hybrid_engine  # noqa: E402
from hybrid_engine.engine import HybridEngine  # noqa: E402
from hybrid_engine.engine.hf_path import HFPathWarning  # noqa: E402

STEPS, NEW = 2, 8


def engine(base: transformers.PreTrainedModel) -> HybridEngine:
    torch.manual_seed(0)  # the same adapters on every rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HFPathWarning)
        return HybridEngine(copy.deepcopy(base), ds_config=ds_config(3), lora=lora("gpt_neox"),
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))


def train(eng: HybridEngine, steps: range) -> list[float]:
    ids, mask = prompts()
    return train_steps(eng, ((ids.roll(step, 1) * mask, mask) for step in steps))  # a new left-padded batch a step


def main(out_dir: str) -> None:
    base = family_model("gpt_neox")  # saved and reloaded per process before torch.distributed starts
    hybrid_engine.engine.training.init_distributed()
    ids, mask = prompts()
    a, b = engine(base), engine(base)
    losses_a = train(a, range(STEPS))
    calls = []  # the trained (ZeRO-3, peft) module's forwards while it generates: none, the plain view runs
    hook = a.module.register_forward_pre_hook(lambda *_: calls.append(1))
    free = a.generate(ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    eos = dict(eos_token_id=int(free.sequences[0, ids.shape[1] + 2]), pad_token_id=0)
    out = a.generate(ids, mask, max_new_tokens=NEW, **eos)
    hook.remove()
    stats = a.stats.as_dict()
    parity = a.logprob_mismatch(out, mask)
    losses_a += train(a, range(STEPS, 2 * STEPS))
    losses_b = train(b, range(2 * STEPS))
    directory = shared_tmpdir()
    a.save_pretrained(directory)
    plain = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    # the trained model after two more steps: generate again and compare with its saved, merged copy
    again = a.generate(ids, mask, max_new_tokens=NEW, **eos)
    hf = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **eos)
    result = dict(losses_with_generation=losses_a, losses_without=losses_b, parity=parity, stats=stats,
                  trained_forwards=len(calls), engine_equals_hf=torch.equal(again.sequences, hf),
                  eos_fired=bool((out.response_mask == 0).any()))
    write_and_leave(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), result)


if __name__ == "__main__":
    main(sys.argv[1])
