"""`hybrid-engine env`: what the kernels are built for and with, whether they load, the machine's measured roofline
and the dispatch choices made on it."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil

import torch

from hybrid_engine import _build
from hybrid_engine.generation import threads as generation_threads
from hybrid_engine.ops import dispatch, load


def add_env_command(subparsers) -> None:
    env = subparsers.add_parser("env", help="report the build environment, whether the C++ ops load, the measured "
                                "roofline and the dispatch choices made on this machine")
    env.add_argument("--calibrate", action="store_true", help="measure the dispatch choices again (a few seconds) "
                     "instead of reading them from the cache beside the build, and cache them even if the machine "
                     "looks busy")
    env.set_defaults(func=cmd_env)


def cmd_env(args: argparse.Namespace) -> int:
    """Prints what the kernels are built for and with, and whether they load."""

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
        ("generation threads", generation_threads_row()),
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
        load()
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


def generation_threads_row() -> str:
    """What generate()'s threads setting does here, and what it would choose now."""
    try:
        setting = generation_threads.parse_threads(None)
    except ValueError as e:
        return f"FAILED: {e}"
    n, why = generation_threads.choose(setting)
    default = f"{generation_threads.ENV}={setting}" if generation_threads.ENV in os.environ else "default 'auto'"
    return (f"{setting!r} ({default}): each generate() call runs on torch's threads less other processes' "
            f"runnable ones, restoring torch's count after; now {n} ({why})" if setting == "auto" else
            f"{setting!r} ({default}): every generate() call runs on {n} threads")


def calibration_rows(force: bool) -> list[tuple[str, str]]:
    """The machine's measured roofline and the dispatch choices made on it (ops/dispatch.py)."""
    try:
        data = dispatch.calibrate(force=force)
    except Exception as e:  # report, don't crash
        return [("calibration", f"FAILED: {e}")]
    r = data["routes"]
    never = dispatch.NEVER
    rows = [("calibration", data["source"])]
    for label, key in (("measured roofline", "roofline"), ("best on this machine", "best_roofline")):
        if key in data:
            rates = data[key]
            rows.append((label, f"read {rates['read_GBps']} GB/s, fp32 matmul {rates['matmul_GFLOPps']} GFLOP/s"))
    if "cpu_share" in data:
        rows.append(("CPU share while measuring", f"{data['cpu_share']:.0%} of {data['key']['threads']} threads"))
    lowp = "never" if r["lowp_kernel_max_rows"] >= never else f"M > {r['lowp_kernel_max_rows']}"
    amx = "not measured" if "amx" not in data else "no AMX on this CPU" if not data["amx"] else (
        "never" if r["amx_min_rows"] >= never else f"M >= {r['amx_min_rows']}")
    sdpa = {-1: "where torch packs bf16 for AMX (unmeasured default)", 0: "never: our causal tiles",
            1: "torch's flash attention (dense batches)"}[r["prefill_sdpa_bf16"]]
    rows += [("decode_linear fp32 weight", f"torch GEMM for M <= {r['fp32_torch_max_rows']} and M > "
                                           f"{r['fp32_kernel_max_rows']}, our kernel between"),
             ("decode_linear bf16 weight", f"our kernel; widened to torch's GEMM: {lowp}; AMX tiles: {amx}"),
             ("prefill attention bf16", sdpa)]
    if data.get("bf16dot") is not None:
        fast = "no AVX512-BF16 kernel on this CPU: torch's bf16 GEMM" if not data["bf16dot"] else (
            f"our VDPBF16PS kernel up to M = {r['bf16act_kernel_max_rows']}, torch's bf16 GEMM above"
            if r["bf16act_kernel_max_rows"] < never else "our VDPBF16PS kernel at every M")
        rows.append(("decode_linear bf16 activations", fast))
    for name, (first, second) in data.get("timings_ms", {}).items():
        sides = SIDES.get(name.rsplit(" ", 1)[-1], ("kernel", "torch"))
        rows.append((f"  {name}", f"{sides[0]} {first:.2f} ms, {sides[1]} {second:.2f} ms"))
    return rows


SIDES = {"fma/amx": ("FMA kernel", "AMX kernel"), "tiles/sdpa": ("our tiles", "SDPA")}

