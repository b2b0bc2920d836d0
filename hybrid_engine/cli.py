"""The `hybrid-engine` command: `env` reports the build environment, `generate` runs fast generation, and
`sft`, `reward` and `chat` run the RLHF steps (hybrid_engine/rlhf/commands.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hybrid_engine.rlhf.commands import add_rlhf_commands


def cmd_env(args: argparse.Namespace) -> int:
    """Prints what the kernels are built for and with, and whether they load."""
    import importlib.metadata as md
    import shutil

    import torch

    from hybrid_engine import _build

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    rows = [
        ("torch", torch.__version__),
        ("CPU", f"{_build.cpu_model()} ({_build.cpu_id() or 'family unknown'})"),
        ("CPU capability (torch)", _build.capability()),
        ("avx512_bf16", "yes" if "avx512_bf16" in _build.cpu_flags() else "no"),
        ("threads", str(torch.get_num_threads())),
        ("CUDA", torch.version.cuda or "no (CPU build of torch)"),
        ("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("nvcc", shutil.which("nvcc") or "not found"),
        ("C++ compiler", shutil.which("c++") or "not found"),
        ("ninja", shutil.which("ninja") or "not found"),
        ("triton", version("triton")),
        ("transformers", version("transformers")),
        ("deepspeed", version("deepspeed")),
        ("build cache", str(_build.build_directory())),
        ("compile flags", " ".join(_build.extra_cflags())),
    ]
    try:
        _build.load()
        ops = torch._C._dispatch_get_all_op_names()
        names = sorted(n.split("::")[1] for n in ops if n.startswith("hybrid_engine::"))
        rows.append(("C++ ops", ", ".join(names)))
    except Exception as e:  # report, don't crash: this command is for diagnosing exactly this
        rows.append(("C++ ops", f"FAILED to load: {e}"))
    rows += calibration_rows(args.calibrate)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def calibration_rows(force: bool) -> list[tuple[str, str]]:
    """The machine's measured roofline and the dispatch choices made on it (ops/dispatch.py)."""
    from hybrid_engine.ops import dispatch

    try:
        data = dispatch.calibrate(force=force)
    except Exception as e:  # report, don't crash
        return [("calibration", f"FAILED: {e}")]
    r = data["routes"]
    never = dispatch.NEVER
    rows = [("calibration", data["source"])]
    if "roofline" in data:
        rows.append(("measured roofline", f"read {data['roofline']['read_GBps']} GB/s, fp32 matmul "
                                          f"{data['roofline']['matmul_GFLOPps']} GFLOP/s"))
    lowp = "never" if r["lowp_kernel_max_rows"] >= never else f"M > {r['lowp_kernel_max_rows']}"
    amx = "not measured" if "amx" not in data else "no AMX on this CPU" if not data["amx"] else (
        "never" if r["amx_min_rows"] >= never else f"M >= {r['amx_min_rows']}")
    sdpa = {-1: "where torch packs bf16 for AMX (unmeasured default)", 0: "never: our causal tiles",
            1: "torch's flash attention (dense batches)"}[r["prefill_sdpa_bf16"]]
    rows += [("decode_linear fp32 weight", f"torch GEMM for M <= {r['fp32_torch_max_rows']} and M > "
                                           f"{r['fp32_kernel_max_rows']}, our kernel between"),
             ("decode_linear bf16 weight", f"our kernel; widened to torch's GEMM: {lowp}; AMX tiles: {amx}"),
             ("prefill attention bf16", sdpa)]
    for name, (first, second) in data.get("timings_ms", {}).items():
        sides = SIDES.get(name.rsplit(" ", 1)[-1], ("kernel", "torch"))
        rows.append((f"  {name}", f"{sides[0]} {first:.2f} ms, {sides[1]} {second:.2f} ms"))
    return rows


SIDES = {"fma/amx": ("FMA kernel", "AMX kernel"), "tiles/sdpa": ("our tiles", "SDPA")}


def cmd_generate(args: argparse.Namespace) -> int:
    """Generates from a saved Hugging Face model or a built-in preset and reports tokens/s."""
    import torch
    import transformers

    import hybrid_engine
    from hybrid_engine.model.presets import preset_model

    torch.manual_seed(args.seed)
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = args.model
    else:
        model = preset_model(args.preset, seed=args.seed)
        name = f"preset {args.preset} (random weights)"
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (args.batch, args.prompt_len))
    weight_dtype = torch.bfloat16 if args.weight_dtype == "bf16" else None
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {name}, {params:.1f}M parameters; batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.max_new_tokens} new tokens, weights {args.weight_dtype}, KV cache {args.kv_dtype}, "
          f"{torch.get_num_threads()} threads")
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    hybrid_engine.generate(model, input_ids[:, :8], max_new_tokens=2)  # warm-up: loads the ops
    t0 = time.perf_counter()
    kv_dtype = torch.bfloat16 if args.kv_dtype == "bf16" else torch.float32
    out = hybrid_engine.generate(model, input_ids, weight_dtype=weight_dtype, kv_dtype=kv_dtype, **kw)
    ours = time.perf_counter() - t0
    n = int(out.response_mask.sum())
    print(f"hybrid_engine.generate: {n / ours:8.1f} tokens/s ({ours:.2f} s)")
    if args.compare_hf:
        t0 = time.perf_counter()
        with torch.no_grad():
            hf = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                do_sample=False, pad_token_id=0)
        t = time.perf_counter() - t0
        m = (hf.shape[1] - args.prompt_len) * args.batch
        print(f"transformers generate:  {m / t:8.1f} tokens/s ({t:.2f} s) -> ours is {t / ours * n / m:.2f}x")
        if not args.sample and weight_dtype is None and args.kv_dtype == "fp32":
            same = torch.equal(hf[:, : out.sequences.shape[1]], out.sequences)
            print(f"greedy sequences identical to transformers: {same}")
    if args.show:
        print("first sequence's new tokens:", out.sequences[0, args.prompt_len:].tolist())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-engine", description="Fast RLHF kernels and generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="report the build environment, whether the C++ ops load, the measured roofline "
                         "and the dispatch choices made on this machine")
    env.add_argument("--calibrate", action="store_true", help="measure the dispatch choices again (a few seconds) "
                     "instead of reading them from the cache beside the build")
    env.set_defaults(func=cmd_env)

    gen = sub.add_parser("generate", help="generate with a saved HF model or a built-in preset, report tokens/s",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--model", help="a directory written by save_pretrained (Llama/Qwen2/Mistral, OPT, GPT-2)")
    src.add_argument("--preset", default="llama-20m", help="a built-in random-weight model: llama-tiny, "
                     "llama-20m or llama-125m (used when --model is not given)")
    gen.add_argument("--batch", type=int, default=8, help="number of prompts generated together")
    gen.add_argument("--prompt-len", type=int, default=64, help="tokens per (random) prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    gen.add_argument("--weight-dtype", choices=["fp32", "bf16"], default="fp32",
                     help="dtype of the weights the decode step reads (activations stay fp32)")
    gen.add_argument("--kv-dtype", choices=["fp32", "bf16"], default="fp32",
                     help="dtype of the KV cache: bf16 halves the bytes attention reads at long contexts (keys "
                          "and values rounded once as they are written; attention still computes in fp32)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this probability mass")
    gen.add_argument("--seed", type=int, default=0, help="seed for the weights, the prompts and sampling")
    gen.add_argument("--compare-hf", action="store_true", help="also time transformers' generate on the same input")
    gen.add_argument("--show", action="store_true", help="print the first sequence's generated token ids")
    gen.set_defaults(func=cmd_generate)
    add_bench_commands(sub)
    add_rlhf_commands(sub)
    return parser


def cmd_bench_report(args: argparse.Namespace) -> int:
    """The tables of docs/ and the README, and the plots, from the benchmarks' JSON (hybrid_engine/report)."""
    from hybrid_engine.report import TABLES, report

    unknown = sorted(set(args.only or []) - set(TABLES))
    if unknown:
        raise SystemExit(f"--only: unknown results {unknown}; known: {sorted(TABLES)}")
    args.plots.mkdir(parents=True, exist_ok=True)
    for line in report(args.results, args.readme, args.plots, args.only, args.docs):
        print(line)
    return 0


def add_bench_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark reports (run the benchmarks with pytest bench/ --benchmark-only)")
    verbs = bench.add_subparsers(dest="bench_command", required=True)
    rep = verbs.add_parser("report", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help="turn the benchmarks' JSON into the markdown tables of docs/ and the README, "
                                "and PNG plots")
    rep.add_argument("--results", type=Path, default=Path("bench/results"),
                     help="the folder of JSON files the benchmarks wrote (kernels.json, generation.json, "
                          "train_step.json, engine.json, rlhf.json, train_summary.json); missing ones are skipped")
    out = rep.add_mutually_exclusive_group()
    out.add_argument("--docs", type=Path, default=None,
                     help="put each table between its <!-- bench:NAME:start/end --> markers in its page of this "
                          "folder, and the headline tables in the README.md beside it; without --docs or --readme "
                          "the tables are printed")
    out.add_argument("--readme", type=Path, default=None,
                     help="put only the tables whose markers this file has into it (the README's headline and "
                          "default-run tables), and warn of the others")
    rep.add_argument("--plots", type=Path, default=Path("bench"), help="where the PNG plots go")
    rep.add_argument("--only", nargs="+", metavar="NAME",
                     help="only these results (file stems, e.g. rlhf generation)")
    rep.set_defaults(func=cmd_bench_report)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
