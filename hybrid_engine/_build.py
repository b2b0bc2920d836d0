"""Sources, flags and loading of the compiled ops: one list serves the JIT load and the AOT build.

The C++ and CUDA sources ship inside the package (hybrid_engine/csrc/), so an installed wheel builds
its ops as a checkout does. The ops are compiled for the CPU they run on (AVX-512 or AVX2 code paths,
as torch itself reports its capability), cached under a directory keyed on torch's version, the
package's location, the Python environment and that capability, and loaded from the cache on every
later import without a rebuild. One process builds at a time (_build_lock.py: a waiting process says which one it
waits for, and a build that was killed is taken over at once).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

from hybrid_engine._build_lock import build_lock

PACKAGE = Path(__file__).resolve().parent  # a checkout's hybrid_engine/ or an install's site-packages/hybrid_engine/
ROOT = PACKAGE.parent  # where setup.py sits in a checkout (the AOT build's sources are relative to it)
CSRC = PACKAGE / "csrc"
INCLUDE_DIRS = [str(CSRC / "include")]

# One list: the CPU kernels, one file per op family, plus the single registration file.
CPU_SOURCES = sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp")) + [str(CSRC / "torch_bindings.cpp")]
# CUDA builds add the torch-free kernels and their thin binding layer.
CUDA_SOURCES = sorted(str(p) for p in (CSRC / "cuda").glob("*.cu")) + [str(CSRC / "cuda" / "bindings.cpp")]

# Flags and defines that make at::vec emit the capability's instructions (without the defines it
# silently falls back to scalar code).
CAPABILITY_FLAGS = {
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY_AVX512",
        "-DCPU_CAPABILITY=AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY_DEFAULT", "-DCPU_CAPABILITY=DEFAULT"],
}
BASE_CFLAGS = ["-O3", "-fopenmp", "-Wno-unused-parameter"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def _cpuinfo(key: str) -> str | None:
    """The first /proc/cpuinfo value of `key` (None where it or the file is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name (the platform's processor name where /proc/cpuinfo is absent)."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_id() -> str | None:
    """The CPU's vendor, family and model numbers ("AuthenticAMD family 25 model 17"), which tell apart CPUs that
    share a model name under a hypervisor ("AMD EPYC"); None where /proc/cpuinfo lacks them."""
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    if family is None or model is None:
        return None
    return f"{_cpuinfo('vendor_id') or '?'} family {family} model {model}"


def capability() -> str:
    """The vector capability to build for: torch's own choice (AVX512, AVX2 or DEFAULT)."""
    cap = os.environ.get("HYBRID_ENGINE_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    return cap if cap in CAPABILITY_FLAGS else "DEFAULT"


def extra_cflags(cap: str | None = None) -> list[str]:
    """Compiler flags for `cap`, plus the bf16 dot-product instructions where the CPU has them."""
    cap = cap or capability()
    flags = BASE_CFLAGS + CAPABILITY_FLAGS[cap]
    if cap == "AVX512" and "avx512_bf16" in cpu_flags():
        flags += ["-mavx512bf16", "-DHE_HAVE_AVX512BF16"]
    return flags


def with_cuda() -> bool:
    """Whether to build the CUDA kernels: a CUDA build of torch, a GPU and nvcc are all needed."""
    if os.environ.get("HYBRID_ENGINE_NO_CUDA") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def extension_name() -> str:
    key = capability().lower() + ("_cuda" if with_cuda() else "")
    return f"hybrid_engine_C_{key}"


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def build_directory() -> Path:
    """The JIT cache: one directory per torch version, package location (a checkout or an install), Python
    environment (sys.prefix), CPU capability and compiler flags. Two checkouts, or two virtualenvs on one checkout,
    sharing one directory would rebuild over each other; nodes of one run sharing a home directory whose CPUs differ
    (AVX512-BF16 on one, not on the other) would load a build whose instructions the other's CPU lacks."""
    base = os.environ.get("HYBRID_ENGINE_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hybrid_engine"
    )
    location, environment = _short_hash(str(PACKAGE)), _short_hash(os.path.realpath(sys.prefix))
    flags = _short_hash(" ".join(extra_cflags()))
    key = f"torch{torch.__version__.replace('+', '_')}-{location}-env{environment}-flags{flags}"
    path = Path(base) / key / extension_name()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_toolchain() -> None:
    """Fail with a plain message, not a ninja traceback, when something needed to compile is missing."""
    from torch.utils.cpp_extension import get_cxx_compiler

    missing = []
    if shutil.which(get_cxx_compiler()) is None:
        missing.append(f"a C++ compiler ('{get_cxx_compiler()}'; install g++, e.g. `apt-get install g++`)")
    if shutil.which("ninja") is None:
        missing.append("ninja (`pip install ninja`)")
    if missing:
        raise RuntimeError(
            "hybrid_engine compiles its C++ ops on first use and needs " + " and ".join(missing) + ". "
            "Alternatively install a build made ahead of time (HYBRID_ENGINE_BUILD_OPS=1 pip install .)."
        )


def _prebuilt() -> str | None:
    """A library built ahead of time by setup.py for this machine's capability, if any."""
    pattern = str(PACKAGE / f"{extension_name()}*.so")
    matches = glob.glob(pattern)
    return matches[0] if matches else None


_loaded = False


def load(verbose: bool = False) -> None:
    """Make torch.ops.hybrid_engine available: load the AOT build or JIT-compile (once) and load."""
    global _loaded
    if _loaded:
        return
    prebuilt = _prebuilt()
    if prebuilt:
        torch.ops.load_library(prebuilt)
        _loaded = True
        return
    _check_toolchain()
    from torch.utils import cpp_extension

    directory = build_directory()
    cuda = with_cuda()
    name = extension_name()
    with build_lock(directory):  # who holds it is named while waiting; a killed build's lock is taken over
        if not (directory / f"{name}.so").exists():
            print(
                f"hybrid_engine: compiling C++ ops for {capability()} (first use, about a minute) in {directory}",
                file=sys.stderr,
            )
        cpp_extension.load(
            name=name,
            sources=CPU_SOURCES + (CUDA_SOURCES if cuda else []),
            extra_cflags=extra_cflags() + (["-DHYBRID_ENGINE_CUDA"] if cuda else []),
            extra_cuda_cflags=NVCC_FLAGS if cuda else None,
            extra_include_paths=INCLUDE_DIRS,
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    _loaded = True


def aot_extension():
    """The setuptools extension for the opt-in ahead-of-time build (HYBRID_ENGINE_BUILD_OPS=1)."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cuda = with_cuda()
    cls = CUDAExtension if cuda else CppExtension
    return cls(
        name=f"hybrid_engine.{extension_name()}",
        sources=[os.path.relpath(s, ROOT) for s in CPU_SOURCES + (CUDA_SOURCES if cuda else [])],
        include_dirs=INCLUDE_DIRS,
        extra_compile_args={"cxx": extra_cflags() + (["-DHYBRID_ENGINE_CUDA"] if cuda else []), "nvcc": NVCC_FLAGS},
        py_limited_api=False,
    )
