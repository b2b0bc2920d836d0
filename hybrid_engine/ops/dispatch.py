"""Choices between implementations, decided by measurement on the machine that runs them.

The CPU decode_linear hands some row counts over to torch's GEMM (linear.cpp): an fp32 weight with very few
rows (torch's matrix-vector product streams at the read bandwidth on some CPUs and at a third of it on
others), an fp32 weight with many rows (compute-bound, where torch's GEMM is faster) and a bf16/fp16 weight
with prefill-sized rows (widened once, then torch's GEMM). On a CPU with AMX, a bf16 weight with enough rows
goes to the AMX tile kernel instead of the AVX-512 FMA one (linear_amx.cpp). A bf16 prefill goes to torch's
flash attention or to our causal tiles (attention.cpp). Where each hand-over lies differs between machines,
so a short calibration (a few seconds) times both sides (on a set of weights larger than the last-level
cache for decode_linear), sets the routes, and caches them as JSON beside the JIT build, one file per
thread count (`calibration-2threads.json`), keyed on the CPU model, its flags, the thread count, torch and
the build. Later processes read the cache; a
cache for another machine or a damaged one is ignored with a warning and measured again.

Choices without a route, because one side won on every machine measured: fp32 prefill attention (our tiles,
2.2x torch's SDPA on Sapphire Rapids, which computes every padded and future position), decode attention
(ours, 1.4-67x the eager reference), and the instruction set, which is the build's (torch's CPU capability:
AVX-512 or AVX2), not a per-call choice.

HYBRID_ENGINE_CALIBRATE=0 skips the measurement and keeps the built-in defaults; HYBRID_ENGINE_CALIBRATION_FILE
moves the cache. `hybrid-engine env` prints the choices, `hybrid-engine env --calibrate` measures again.
Every route computes with fp32 products and sums: the choice changes speed, never the op's tolerance (tested).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hybrid_engine import _build
from hybrid_engine.ops._library import kernels, load

FORMAT = "hybrid_engine.calibration.v2"
NEVER = 2**62
"""A row bound no batch reaches."""
K = 2048  # the calibration weights: 4 of [K, K], 64 MiB in fp32 and 32 MiB in bf16, past a 32 MiB L3
WEIGHTS = 4
FEW_ROWS = (1, 2, 4)
MANY_ROWS = (8, 16, 32, 64, 128)
LOWP_ROWS = (64, 128, 256)
AMX_ROWS = (8, 16, 32, 64)
PREFILL = dict(B=4, T=256, Hq=8, Hkv=2, D=64)  # a dense bf16 prefill batch (every row full)


@dataclass(frozen=True)
class Routes:
    """decode_linear's hand-over rows (linear.cpp): torch's GEMM for an fp32 weight at M <= fp32_torch_max_rows
    or M > fp32_kernel_max_rows, for a bf16/fp16 weight at M > lowp_kernel_max_rows; the kernel otherwise, on
    AMX tiles for a bf16 weight with M >= amx_min_rows where the CPU has AMX. prefill_sdpa_bf16: a dense bf16
    prefill goes to torch's flash attention (1) or our tiles (0); -1: where torch packs bf16 for AMX. The
    defaults (used unmeasured with HYBRID_ENGINE_CALIBRATE=0) are the routes measured on Sapphire Rapids."""

    fp32_torch_max_rows: int = 1
    fp32_kernel_max_rows: int = 64
    lowp_kernel_max_rows: int = 64
    amx_min_rows: int = 8
    prefill_sdpa_bf16: int = -1


DEFAULT = Routes()
_state: dict = {"calibration": None}


def cache_path() -> Path:
    """HYBRID_ENGINE_CALIBRATION_FILE, or one file per thread count beside the build: a process with another
    count (torchrun ranks of one thread each beside a 2-thread process) keeps its own calibration instead of
    overwriting the other's, which each would then find foreign and measure again."""
    given = os.environ.get("HYBRID_ENGINE_CALIBRATION_FILE")
    return Path(given) if given else _build.build_directory() / f"calibration-{torch.get_num_threads()}threads.json"


def machine_key() -> dict:
    """What a calibration is valid for."""
    flags = sorted(f for f in _build.cpu_flags() if f.startswith(("avx", "amx", "fma")))
    return {"cpu": _build.cpu_model(), "capability": _build.capability(), "flags": flags,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "build": _build.extension_name()}


# -- measuring ------------------------------------------------------------------------------------------------


def _best_s(fn: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of `repeats` timed runs after a warm-up (the least disturbed by other work on the machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _force(routes: Routes) -> None:
    kernels().set_decode_linear_routes(routes.fp32_torch_max_rows, routes.fp32_kernel_max_rows,
                                       routes.lowp_kernel_max_rows, routes.amx_min_rows)
    kernels().set_prefill_sdpa_route(routes.prefill_sdpa_bf16)


KERNEL_ONLY = Routes(0, NEVER, NEVER, amx_min_rows=NEVER)  # the FMA kernel at every M


def _linear_pass(weights: list[torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    return lambda: [kernels().decode_linear(x, w, None) for w in weights]


def _race(weights: list[torch.Tensor], rows: int, widen: bool) -> tuple[float, float]:
    """(kernel s, torch s) for one pass of `rows` activation rows over every weight."""
    x = torch.randn(rows, K)
    _force(KERNEL_ONLY)
    ours = _best_s(_linear_pass(weights, x))
    if widen:
        theirs = _best_s(lambda: [torch.mm(x, w.to(torch.float32).t()) for w in weights])
    else:
        theirs = _best_s(lambda: [torch.mm(x, w.t()) for w in weights])
    return ours, theirs


def _torch_prefix(rows: tuple[int, ...], times: dict[int, tuple[float, float]]) -> int:
    """The largest M of `rows` up to which torch won at every measured M; 0 if it lost at the first."""
    bound = 0
    for m in rows:
        if times[m][1] >= times[m][0]:
            break
        bound = m
    return bound


def _kernel_max(rows: tuple[int, ...], times: dict[int, tuple[float, float]], floor: int) -> int:
    """The largest M of `rows` at which the kernel won (at least `floor`): one noisy loss below it changes
    nothing, and past the largest measured M the kernel is not assumed to win."""
    return max([floor] + [m for m in rows if times[m][0] <= times[m][1]])


def _race_amx(weights: list[torch.Tensor], rows: int) -> tuple[float, float]:
    """(FMA kernel s, AMX kernel s) for one pass of `rows` activation rows over every bf16 weight."""
    x = torch.randn(rows, K)
    _force(KERNEL_ONLY)
    fma = _best_s(_linear_pass(weights, x))
    _force(replace(KERNEL_ONLY, amx_min_rows=1))
    return fma, _best_s(_linear_pass(weights, x))


def _race_prefill() -> tuple[float, float]:
    """(our tiles s, torch's SDPA s) for a dense bf16 prefill batch (PREFILL)."""
    p = PREFILL
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(p["B"], h, p["T"], p["D"], generator=gen).bfloat16() for h in (p["Hq"], p["Hkv"], p["Hkv"]))
    lens = torch.full((p["B"],), p["T"])
    times = []
    for route in (0, 1):
        _force(replace(DEFAULT, prefill_sdpa_bf16=route))
        times.append(_best_s(lambda: kernels().prefill_attention(q, k, v, lens, 0.125)))
    return times[0], times[1]


def _amx_min(rows: tuple[int, ...], times: dict[int, tuple[float, float]]) -> int:
    """The smallest M of `rows` from which AMX won at every larger measured M; NEVER if it lost at the largest."""
    bound = NEVER
    for m in reversed(rows):
        if times[m][1] > times[m][0]:
            break
        bound = m
    return bound


def roofline() -> dict:
    """The machine's read bandwidth (a sum() over 256 MiB) and fp32 matmul rate (1024^3), measured now."""
    big = torch.ones(64 * 1024 * 1024)
    read_s = _best_s(big.sum, repeats=5)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm_s = _best_s(lambda: a @ b, repeats=5)
    return {"read_GBps": round(big.numel() * 4 / read_s / 1e9, 1), "matmul_GFLOPps": round(2 * 1024**3 / mm_s / 1e9, 1)}


def measure() -> dict:
    """Times both sides of every hand-over and returns the calibration (routes, timings, roofline)."""
    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(K, K, generator=gen) for _ in range(WEIGHTS)]
    timings = {f"fp32 M={m}": _race(fp32, m, False) for m in FEW_ROWS + MANY_ROWS}
    lowp = [w.to(torch.bfloat16) for w in fp32]
    del fp32
    timings.update({f"bf16 M={m}": _race(lowp, m, True) for m in LOWP_ROWS})
    has_amx = kernels().decode_linear_has_amx(K)
    if has_amx:
        timings.update({f"bf16 M={m} fma/amx": _race_amx(lowp, m) for m in AMX_ROWS})
    del lowp
    timings["prefill bf16 tiles/sdpa"] = _race_prefill()
    few = _torch_prefix(FEW_ROWS, {m: timings[f"fp32 M={m}"] for m in FEW_ROWS})
    many = _kernel_max(MANY_ROWS, {m: timings[f"fp32 M={m}"] for m in MANY_ROWS}, floor=FEW_ROWS[-1])
    lowp_max = _kernel_max(LOWP_ROWS, {m: timings[f"bf16 M={m}"] for m in LOWP_ROWS}, floor=LOWP_ROWS[0])
    amx = _amx_min(AMX_ROWS, {m: timings[f"bf16 M={m} fma/amx"] for m in AMX_ROWS}) if has_amx else NEVER
    tiles_s, sdpa_s = timings["prefill bf16 tiles/sdpa"]
    routes = Routes(fp32_torch_max_rows=few, fp32_kernel_max_rows=max(many, few),
                    lowp_kernel_max_rows=NEVER if lowp_max == LOWP_ROWS[-1] else lowp_max, amx_min_rows=amx,
                    prefill_sdpa_bf16=int(sdpa_s < tiles_s))
    return {"format": FORMAT, "key": machine_key(), "routes": asdict(routes), "roofline": roofline(), "amx": has_amx,
            "timings_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in timings.items()},
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- the cache --------------------------------------------------------------------------------------------------


def _read_cache(path: Path) -> dict | None:
    """The cached calibration for this machine, or None (with a warning when a file was there but unusable)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        Routes(**data["routes"])
        usable = data.get("format") == FORMAT and data.get("key") == machine_key()
    except (OSError, ValueError, KeyError, TypeError):
        warnings.warn(f"{path}: unreadable calibration cache, ignored; measuring again", stacklevel=3)
        return None
    if not usable:
        warnings.warn(f"{path}: calibration made for another machine or build, ignored; measuring again",
                      stacklevel=3)
        return None
    return data


def _write_cache(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


def calibrate(force: bool = False) -> dict:
    """This process's calibration: the cache's when it fits this machine (unless `force`), else measured and
    cached; the routes are set. With HYBRID_ENGINE_CALIBRATE=0, the defaults, unmeasured."""
    load()
    if os.environ.get("HYBRID_ENGINE_CALIBRATE", "1") == "0" and not force:
        data = {"format": FORMAT, "key": machine_key(), "routes": asdict(DEFAULT), "source": "defaults"}
    else:
        path = cache_path()
        data = None if force else _read_cache(path)
        if data is None:
            data = measure()
            _write_cache(path, data)
            data = {**data, "source": "measured now"}
        else:
            data = {**data, "source": f"cached ({path})"}
    _force(Routes(**data["routes"]))
    _state["calibration"] = data
    return data


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing, outside the graph
def ensure() -> bool:
    """Calibrates once per process, before the first CPU decode_linear or decode_step call. Returns True."""
    if _state["calibration"] is None:
        calibrate()
    return True


def current() -> Routes:
    """The routes in force now."""
    return Routes(*kernels().decode_linear_routes(), kernels().prefill_sdpa_route())


@contextlib.contextmanager
def routes(value: Routes) -> Iterator[None]:
    """Run the block with other routes (tests force each implementation this way)."""
    ensure()
    previous = current()
    _force(value)
    try:
        yield
    finally:
        _force(previous)
