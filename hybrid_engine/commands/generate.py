"""`hybrid-engine generate`: fast generation from a saved Hugging Face model or a built-in preset, in tokens/s, and
optionally against transformers' own generate on the same input; with --prompt or --prompts-file, text prompts
completed and printed (generate_text.py)."""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from hybrid_engine.commands.generate_text import add_text_args, run_text, wants_text
from hybrid_engine.generation import SamplingParams, generate
from hybrid_engine.generation.threads import parse_threads
from hybrid_engine.model.dtypes import ACTIVATION_DTYPES, KV_DTYPES, WEIGHT_DTYPES, dtype_name
from hybrid_engine.model.presets import PRESETS, preset_model


def add_generate_command(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="generate with a saved HF model or a built-in preset, report "
                                "tokens/s; or complete text prompts (--prompt)",
                                description="Without --prompt: a speed benchmark, --batch random prompts of "
                                "--prompt-len tokens, every row generating all --max-new-tokens. With --prompt or "
                                "--prompts-file: those texts completed by --model (stopping at its eos) and printed.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--model", help="a directory written by save_pretrained (Llama/Qwen2/Qwen3/OLMo 2/SmolLM3/"
                     "Phi-3/Gemma 3/Mistral/Qwen3-MoE/Mixtral, OPT, GPT-2)")
    src.add_argument("--preset", default="llama-20m", help=f"a built-in random-weight model: {', '.join(PRESETS)} "
                     "(used when --model is not given)")
    gen.add_argument("--batch", type=int, default=8, help="number of prompts generated together")
    gen.add_argument("--prompt-len", type=int, default=64, help="tokens per (random) prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    gen.add_argument("--weight-dtype", choices=[dtype_name(d) for d in WEIGHT_DTYPES], default="fp32",
                     help="dtype of the weights the decode step reads (activations stay fp32 unless --activation-dtype "
                          "bf16)")
    gen.add_argument("--activation-dtype", choices=[dtype_name(d) for d in ACTIVATION_DTYPES], default="fp32",
                     help="dtype the linear layers' inputs are rounded to: fp32 is exact; bf16 is the fast mode (needs "
                          "--weight-dtype bf16 and a CPU with avx512_bf16 or amx_bf16; log-probs differ from the exact "
                          "path's, see docs/generation.md)")
    gen.add_argument("--kv-dtype", choices=[dtype_name(d) for d in KV_DTYPES], default="fp32",
                     help="dtype of the KV cache: bf16 or fp16 halve the bytes attention reads at long contexts (keys "
                          "and values rounded once as they are written; attention still computes in fp32)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this probability mass")
    gen.add_argument("--seed", type=int, default=0, help="seed for the weights, the prompts and sampling")
    gen.add_argument("--compare-hf", action="store_true", help="also time transformers' generate on the same input")
    gen.add_argument("--show", action="store_true", help="print the first sequence's generated token ids")
    add_text_args(gen)
    gen.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generates from a saved Hugging Face model or a built-in preset and reports tokens/s (or completes text
    prompts: run_text)."""
    if wants_text(args):
        return run_text(args)
    torch.manual_seed(args.seed)
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = args.model
    else:
        model = preset_model(args.preset, seed=args.seed)
        name = f"preset {args.preset} (random weights)"
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (args.batch, args.prompt_len))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {name}, {params:.1f}M parameters; batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.max_new_tokens} new tokens, weights {args.weight_dtype}, activations {args.activation_dtype}, "
          f"KV cache {args.kv_dtype}, {torch.get_num_threads()} threads, generation threads={parse_threads(None)!r} "
          "(hybrid-engine env says what that chooses)")
    # eos_token_id=[]: no eos, not the model's generation_config's. This is a tokens/s benchmark on random prompts:
    # every row generates all --max-new-tokens (as transformers' side does, told eos_token_id=None too), so the
    # figures stay comparable between models, runs and --compare-hf.
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=[])
    generate(model, input_ids[:, :8], max_new_tokens=2)  # warm-up: loads the ops
    t0 = time.perf_counter()
    out = generate(model, input_ids, sampling=sampling, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype,
                   activation_dtype=args.activation_dtype)
    ours = time.perf_counter() - t0
    n = int(out.response_mask.sum())
    print(f"hybrid_engine.generate: {n / ours:8.1f} tokens/s ({ours:.2f} s)")
    if args.compare_hf:
        t0 = time.perf_counter()
        with torch.no_grad():
            # No eos, as on our side (min_new_tokens would instead forbid the eos token, changing greedy choices).
            hf = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
        t = time.perf_counter() - t0
        m = (hf.shape[1] - args.prompt_len) * args.batch
        print(f"transformers generate:  {m / t:8.1f} tokens/s ({t:.2f} s) -> ours is {t / ours * n / m:.2f}x")
        if not args.sample and args.weight_dtype == args.kv_dtype == args.activation_dtype == "fp32":
            same = torch.equal(hf[:, : out.sequences.shape[1]], out.sequences)
            print(f"greedy sequences identical to transformers: {same}")
    if args.show:
        print("first sequence's new tokens:", out.sequences[0, args.prompt_len:].tolist())
    return 0

