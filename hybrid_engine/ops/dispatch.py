"""Choices between implementations, decided by measurement on the machine that runs them.

The CPU decode_linear hands some row counts over to torch's GEMM (linear.cpp): an fp32 weight with very few
rows (torch's matrix-vector product streams at the read bandwidth on some CPUs and at a third of it on
others), an fp32 weight with many rows (compute-bound, where torch's GEMM is faster) and a bf16/fp16 weight
with prefill-sized rows (widened once, then torch's GEMM). On a CPU with AMX, a bf16 weight with enough rows
goes to the AMX tile kernel instead of the AVX-512 FMA one (linear_amx.cpp). The fast mode's decode_linear_bf16
(bf16 activations) hands rows past a measured count over to torch's bf16 GEMM (linear_bf16dot.cpp). A bf16 prefill
goes to torch's flash attention or to our causal tiles (attention.cpp). Where each hand-over lies differs between
machines, so a short calibration (a few seconds) times both sides (on a set of weights larger than the last-level
cache for decode_linear), sets the routes, and caches them as JSON beside the JIT build, one file per
thread count and CPU (`calibration-2threads-<8 hex digits>.json`: nodes sharing a home directory whose CPU models
differ keep one each), keyed on the CPU model, its flags, the thread count, torch and
the build. Later processes read the cache; a
cache for another machine or a damaged one is ignored with a warning and measured again.

Load on the machine skews the races, and a cached calibration stands for every later run, so each race times its
sides in turn (A B A B ..., five rounds after a warm-up) and keeps the best run of each, and a calibration judged
taken under load (under_load: its process got under half the CPU time its threads could use, or a roofline rate
is under half the best measured on this machine, which the cache keeps) is used by the process that measured it
but cached only as provisional: the next process measures again. A forced calibration is cached as final.

Choices without a route, because one side won on every machine measured: fp32 prefill attention (our tiles,
2.2x torch's SDPA on Sapphire Rapids, which computes every padded and future position), decode attention
(ours, 1.4-67x the eager reference), and the instruction set, which is the build's (torch's CPU capability:
AVX-512 or AVX2), not a per-call choice.

HYBRID_ENGINE_CALIBRATE=0 skips the measurement and keeps the built-in defaults; HYBRID_ENGINE_CALIBRATION_FILE
moves the cache. `hybrid-engine env` prints the choices, `hybrid-engine env --calibrate` measures again (forced).
Every route computes with fp32 products and sums: the choice changes speed, never the op's tolerance (tested); the
fast mode's torch route rounds its output to bf16, within decode_linear_bf16's tolerance (tests/test_linear_bf16.py).
"""

from __future__ import annotations

import contextlib
import hashlib
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

FORMAT = "hybrid_engine.calibration.v3"
NEVER = 2**62
"""A row bound no batch reaches."""
K = 2048  # the calibration weights: 4 of [K, K], 64 MiB in fp32 and 32 MiB in bf16, past a 32 MiB L3
WEIGHTS = 4
FEW_ROWS = (1, 2, 4)
MANY_ROWS = (8, 16, 32, 64, 128)
LOWP_ROWS = (64, 128, 256)
AMX_ROWS = (8, 16, 32, 64)
BF16ACT_ROWS = (2, 4, 8, 16, 32, 64, 128)
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
    bf16act_kernel_max_rows: int = 8
    """decode_linear_bf16 (the fast mode, bf16 activations): the VDPBF16PS kernel up to this many rows, torch's bf16
    GEMM above (the default: measured on a Zen 4, where torch's won from M = 16)."""


DEFAULT = Routes()
_state: dict = {"calibration": None}


def cache_path() -> Path:
    """HYBRID_ENGINE_CALIBRATION_FILE, or one file per thread count and machine_key beside the build: a process with
    another count (torchrun ranks of one thread each beside a 2-thread process), or on another CPU (a node sharing
    the home directory), keeps its own calibration instead of overwriting the other's, which each would then find
    foreign and measure again."""
    given = os.environ.get("HYBRID_ENGINE_CALIBRATION_FILE")
    if given:
        return Path(given)
    machine = hashlib.sha1(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:8]
    return _build.build_directory() / f"calibration-{torch.get_num_threads()}threads-{machine}.json"


def machine_key() -> dict:
    """What a calibration is valid for."""
    flags = sorted(f for f in _build.cpu_flags() if f.startswith(("avx", "amx", "fma")))
    return {"cpu": _build.cpu_model(), "capability": _build.capability(), "flags": flags,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "build": _build.extension_name()}


# -- measuring ------------------------------------------------------------------------------------------------


clock = time.perf_counter  # every race's timer (a test records the order of the runs through it)


def _interleaved_best(fns: list[Callable[[], object]], rounds: int = 5) -> list[float]:
    """The fastest of `rounds` timed runs of each of `fns`, after a warm-up of each, taken in turn (A B A B ...):
    a burst of other work on the machine slows one run of each side, not every run of one side, and the best
    run of each is the least disturbed."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


def _force(routes: Routes) -> None:
    kernels().set_decode_linear_routes(routes.fp32_torch_max_rows, routes.fp32_kernel_max_rows,
                                       routes.lowp_kernel_max_rows, routes.amx_min_rows)
    kernels().set_prefill_sdpa_route(routes.prefill_sdpa_bf16)
    kernels().set_decode_linear_bf16_route(routes.bf16act_kernel_max_rows)


KERNEL_ONLY = Routes(0, NEVER, NEVER, amx_min_rows=NEVER)  # the FMA kernel at every M


def _linear_pass(weights: list[torch.Tensor], x: torch.Tensor, routes: Routes | None) -> Callable[[], object]:
    """One pass of `x` over every weight, on `routes` (set in the pass, where a race interleaves two routes) or on
    the routes in force (None)."""
    if routes is None:
        return lambda: [kernels().decode_linear(x, w, None) for w in weights]
    return lambda: (_force(routes), [kernels().decode_linear(x, w, None) for w in weights])


def _race(weights: list[torch.Tensor], rows: int, widen: bool) -> tuple[float, float]:
    """(kernel s, torch s) for one pass of `rows` activation rows over every weight."""
    x = torch.randn(rows, K)

    def theirs() -> list[torch.Tensor]:
        return [torch.mm(x, (w.to(torch.float32) if widen else w).t()) for w in weights]

    _force(KERNEL_ONLY)  # torch's side takes no route: none is set in the timed runs
    ours, torch_s = _interleaved_best([_linear_pass(weights, x, None), theirs])
    return ours, torch_s


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
    fma, amx = _interleaved_best([_linear_pass(weights, x, KERNEL_ONLY),
                                  _linear_pass(weights, x, replace(KERNEL_ONLY, amx_min_rows=1))])
    return fma, amx


def _race_bf16act(weights: list[torch.Tensor], rows: int) -> tuple[float, float]:
    """(VDPBF16PS kernel s, torch's bf16 GEMM s) for one pass of `rows` activation rows over every bf16 weight."""
    x = torch.randn(rows, K)
    _force(replace(DEFAULT, bf16act_kernel_max_rows=NEVER))

    def ours() -> list[torch.Tensor]:
        return [kernels().decode_linear_bf16(x, w, None) for w in weights]

    def theirs() -> list[torch.Tensor]:
        return [torch.mm(x.to(torch.bfloat16), w.t()).float() for w in weights]

    kernel_s, torch_s = _interleaved_best([ours, theirs])
    return kernel_s, torch_s


def _race_prefill() -> tuple[float, float]:
    """(our tiles s, torch's SDPA s) for a dense bf16 prefill batch (PREFILL)."""
    p = PREFILL
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(p["B"], h, p["T"], p["D"], generator=gen).bfloat16() for h in (p["Hq"], p["Hkv"], p["Hkv"]))
    lens = torch.full((p["B"],), p["T"])

    def on(route: int) -> Callable[[], object]:
        return lambda: (_force(replace(DEFAULT, prefill_sdpa_bf16=route)),
                        kernels().prefill_attention(q, k, v, lens, 0.125))

    tiles, sdpa = _interleaved_best([on(0), on(1)])
    return tiles, sdpa


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
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    read_s, mm_s = _interleaved_best([big.sum, lambda: a @ b])
    return {"read_GBps": round(big.numel() * 4 / read_s / 1e9, 1), "matmul_GFLOPps": round(2 * 1024**3 / mm_s / 1e9, 1)}


def measure() -> dict:
    """Times both sides of every hand-over and returns the calibration (routes, timings, roofline)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(K, K, generator=gen) for _ in range(WEIGHTS)]
    timings = {f"fp32 M={m}": _race(fp32, m, False) for m in FEW_ROWS + MANY_ROWS}
    lowp = [w.to(torch.bfloat16) for w in fp32]
    del fp32
    timings.update({f"bf16 M={m}": _race(lowp, m, True) for m in LOWP_ROWS})
    has_amx = kernels().decode_linear_has_amx(K)
    if has_amx:
        timings.update({f"bf16 M={m} fma/amx": _race_amx(lowp, m) for m in AMX_ROWS})
    has_bf16dot = kernels().decode_linear_has_bf16dot()
    if has_bf16dot:
        timings.update({f"bf16act M={m}": _race_bf16act(lowp, m) for m in BF16ACT_ROWS})
    del lowp
    timings["prefill bf16 tiles/sdpa"] = _race_prefill()
    few = _torch_prefix(FEW_ROWS, {m: timings[f"fp32 M={m}"] for m in FEW_ROWS})
    many = _kernel_max(MANY_ROWS, {m: timings[f"fp32 M={m}"] for m in MANY_ROWS}, floor=FEW_ROWS[-1])
    lowp_max = _kernel_max(LOWP_ROWS, {m: timings[f"bf16 M={m}"] for m in LOWP_ROWS}, floor=LOWP_ROWS[0])
    amx = _amx_min(AMX_ROWS, {m: timings[f"bf16 M={m} fma/amx"] for m in AMX_ROWS}) if has_amx else NEVER
    tiles_s, sdpa_s = timings["prefill bf16 tiles/sdpa"]
    # The kernel up to the first M where torch's bf16 GEMM won (one noisy win at a large M moves nothing); at least 1.
    bf16act = max(1, _torch_prefix(BF16ACT_ROWS, {m: timings[f"bf16act M={m}"][::-1] for m in BF16ACT_ROWS})
                  ) if has_bf16dot else 0
    routes = Routes(fp32_torch_max_rows=few, fp32_kernel_max_rows=max(many, few),
                    lowp_kernel_max_rows=NEVER if lowp_max == LOWP_ROWS[-1] else lowp_max, amx_min_rows=amx,
                    prefill_sdpa_bf16=int(sdpa_s < tiles_s),
                    bf16act_kernel_max_rows=NEVER if bf16act == BF16ACT_ROWS[-1] else bf16act)
    rates = roofline()
    share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    return {"format": FORMAT, "key": machine_key(), "routes": asdict(routes), "roofline": rates, "amx": has_amx,
            "bf16dot": has_bf16dot,
            "cpu_share": round(share, 2), "timings_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in timings.items()},
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- under load? ------------------------------------------------------------------------------------------------

FAR_BELOW = 0.5
"""A roofline rate under this fraction of the best measured on the machine marks a calibration taken under load."""
MIN_CPU_SHARE = 0.5
"""A calibration whose process got less CPU time than this fraction of (wall time x threads) ran beside other work."""
RATES = (("read_GBps", "read", "GB/s"), ("matmul_GFLOPps", "matmul", "GFLOP/s"))


def kept_best(previous: dict | None) -> dict | None:
    """The best roofline measured on this machine so far, as kept by `previous` (a cached calibration), or None."""
    if previous is None:
        return None
    return previous.get("best_roofline", previous.get("roofline"))


def best_roofline(previous: dict | None, now: dict) -> dict:
    """The best of each roofline rate measured on this machine: `now` and the best `previous` kept."""
    kept = kept_best(previous) or {}
    return {name: max(now[name], kept.get(name, 0.0)) for name, _, _ in RATES}


def under_load(data: dict, best: dict | None) -> str | None:
    """Why the measurement `data` looks taken while other work ran on the machine, or None: its process got under
    MIN_CPU_SHARE of the CPU its threads could use, or a roofline rate is under FAR_BELOW of the machine's best."""
    share = data.get("cpu_share", 1.0)
    if share < MIN_CPU_SHARE:
        return f"it got {share:.0%} of {torch.get_num_threads()} threads' CPU time"
    for name, label, unit in RATES:
        if best and data["roofline"][name] < FAR_BELOW * best[name]:
            return f"{label} {data['roofline'][name]} {unit} vs best {best[name]}"
    return None


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


def _measured(path: Path, previous: dict | None, force: bool) -> dict:
    """Measures, judges whether under load against `previous` (the cache found, or None) and caches: under load
    and not `force`, marked provisional (measured again by the next process, the best roofline kept)."""
    data = measure()
    why = under_load(data, kept_best(previous))
    data["best_roofline"] = best_roofline(previous, data["roofline"])
    data["provisional"] = bool(why) and not force
    _write_cache(path, data)
    if why is None:
        return {**data, "source": "measured now"}
    if force:
        return {**data, "source": f"measured now under load ({why}), cached as forced"}
    note = f"calibration taken under load ({why}): used by this process only, measured again next run"
    warnings.warn(f"{note}; `hybrid-engine env --calibrate` caches one anyway", stacklevel=3)
    return {**data, "source": note}


def calibrate(force: bool = False) -> dict:
    """This process's calibration: the cache's when it fits this machine and was not taken under load (unless
    `force`), else measured and cached (provisional when taken under load, see under_load; cached as final when
    `force`); the routes are set. With HYBRID_ENGINE_CALIBRATE=0, the defaults, unmeasured."""
    load()
    if os.environ.get("HYBRID_ENGINE_CALIBRATE", "1") == "0" and not force:
        data = {"format": FORMAT, "key": machine_key(), "routes": asdict(DEFAULT), "source": "defaults"}
    else:
        path = cache_path()
        cached = _read_cache(path)
        if cached is None or cached.get("provisional") or force:
            data = _measured(path, cached, force)
        else:
            data = {**cached, "source": f"cached ({path})"}
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
    return Routes(*kernels().decode_linear_routes(), kernels().prefill_sdpa_route(),
                  kernels().decode_linear_bf16_route())


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
