"""hybrid_engine.keep_freed_memory: after it, a large tensor freed and allocated again reuses the process's memory
instead of being page-faulted in afresh (run in a process of its own: the setting is process-wide)."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
import hybrid_engine
if sys.argv[1] == "keep":
    assert hybrid_engine.keep_freed_memory() and hybrid_engine.keep_freed_memory()  # twice: a no-op
torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(48 << 20, dtype=torch.uint8).fill_(1)  # fits in the freed block (an aligned 64 MiB would not, quite)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_tensor_is_reused_without_page_faults():
    pages = (48 << 20) // 4096
    assert _faults("default") > pages // 2  # malloc's default: a fresh mmap, every page faulted again
    assert _faults("keep") < pages // 100  # the heap's freed block, already resident


ENGINE_PROBE = """
import resource, sys, psutil, torch, transformers
import hybrid_engine
if sys.argv[1] == "keep":
    assert hybrid_engine.keep_freed_memory()
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
eng = hybrid_engine.HybridEngine(transformers.AutoModelForCausalLM.from_config(config),
                                 generation={"weight_dtype": "bf16"})
ids, mask = torch.randint(3, 4096, (16, 64)), torch.ones(16, 64, dtype=torch.long)

def train_step():
    eng.backward(eng.token_logprobs(ids, mask, 1).mean())
    eng.step()

train_step()
rss = psutil.Process().memory_info().rss
with eng.generation_mode():
    eng.generate(ids, mask, max_new_tokens=64, eos_token_id=None)  # no eos: all 64 tokens, every time
after = psutil.Process().memory_info().rss
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
train_step()
print(rss, after, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _engine_probe(mode: str) -> tuple[int, int, int]:
    """(RSS before generation mode, RSS after leaving it, page faults of the training step that follows)."""
    run = subprocess.run([sys.executable, "-c", ENGINE_PROBE, mode], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rss, after, faults = map(int, run.stdout.split()[-3:])
    return rss, after, faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and malloc_trim are glibc's")
def test_leaving_generation_mode_returns_the_memory_or_keeps_it_for_training():
    rss, after, faults = _engine_probe("default")
    assert abs(after - rss) <= 0.1 * rss  # malloc's default: the generation's memory goes back to the OS
    _, _, kept_faults = _engine_probe("keep")
    # keep_freed_memory: the engine does not trim, and the training step after generation reuses the pages
    # (measured: 34-38 thousand faults by default, 9-14 thousand kept, for this 5M model).
    assert kept_faults < faults / 2
