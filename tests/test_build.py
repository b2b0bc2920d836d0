import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib  # Python 3.11+
except ImportError:
    tomllib = None

from hybrid_engine import _build


def test_flags_follow_the_capability():
    assert "-DCPU_CAPABILITY=AVX512" in _build.extra_cflags("AVX512")
    assert "-mavx512f" in _build.extra_cflags("AVX512")
    avx2 = _build.extra_cflags("AVX2")
    assert "-DCPU_CAPABILITY=AVX2" in avx2 and "-mavx2" in avx2 and not any("avx512" in f for f in avx2)
    assert not any(f.startswith("-mavx") for f in _build.extra_cflags("DEFAULT"))


def test_cache_is_keyed_on_torch_and_capability():
    path = str(_build.build_directory())
    assert _build.capability().lower() in path and "torch" in path


def test_cache_is_keyed_on_the_environment_and_the_package_location(monkeypatch, tmp_path):
    # Two virtualenvs on one checkout, or two checkouts (or installs) in one environment, build apart.
    monkeypatch.setenv("HYBRID_ENGINE_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv-a"))
    a = _build.build_directory()
    assert _build.build_directory() == a  # stable: a later process finds its build
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv-b"))
    b = _build.build_directory()
    monkeypatch.setattr(_build, "PACKAGE", tmp_path / "site-packages" / "hybrid_engine")
    c = _build.build_directory()
    assert len({a, b, c}) == 3 and all(p.parent.parent == tmp_path and p.is_dir() for p in (a, b, c))
    assert all(p.name == _build.extension_name() and p.parent.name.startswith("torch") for p in (a, b, c))


def test_cache_is_keyed_on_the_compiler_flags(monkeypatch, tmp_path):
    # Nodes sharing a home directory, one CPU with AVX512-BF16 and one without, build apart.
    monkeypatch.setenv("HYBRID_ENGINE_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("HYBRID_ENGINE_CPU_CAPABILITY", "AVX512")
    monkeypatch.setattr(_build, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    with_bf16 = _build.build_directory()
    monkeypatch.setattr(_build, "cpu_flags", lambda: {"avx512f"})
    assert _build.build_directory() != with_bf16 and with_bf16.name == _build.extension_name()


PACKAGE = Path(_build.__file__).resolve().parent


def test_sources_ship_inside_the_package():
    sources = [Path(s) for s in _build.CPU_SOURCES + _build.CUDA_SOURCES + _build.INCLUDE_DIRS]
    assert all(s.is_relative_to(PACKAGE / "csrc") and s.exists() for s in sources)
    names = {s.relative_to(PACKAGE / "csrc").as_posix() for s in sources}
    assert {"torch_bindings.cpp", "cpu/norm.cpp", "cuda/norm.cu", "cuda/bindings.cpp", "include"} <= names


def test_the_aot_build_names_its_sources_relative_to_setup_py():
    ext = _build.aot_extension()
    assert ext.sources and all(not os.path.isabs(s) and (_build.ROOT / s).is_file() for s in ext.sources)
    assert "hybrid_engine/csrc/torch_bindings.cpp" in ext.sources


@pytest.mark.skipif(tomllib is None or not (PACKAGE.parent / "pyproject.toml").exists(), reason="needs a checkout")
def test_package_data_carries_every_source_file():
    # The wheel and the sdist take what these patterns match (setuptools globs them recursively).
    patterns = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {Path(f) for p in patterns["hybrid_engine"] for f in glob.glob(str(PACKAGE / p), recursive=True)}
    files = {f for f in (PACKAGE / "csrc").rglob("*") if f.is_file()}
    assert files and files <= shipped, sorted(str(f) for f in files - shipped)


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C.. compiler .* and ninja"):
        _build._check_toolchain()


def test_second_import_does_not_rebuild():
    # A fresh process loads the cached library: no compiler message, and well under a build's time.
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", "import time, hybrid_engine.ops; t = time.time(); "
                          "hybrid_engine.ops.load(); print(round(time.time() - t, 2))"],
                         capture_output=True, text=True, env=env, check=True)
    assert "compiling C++ ops" not in out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 30


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx512f avx512_bf16
"""


def test_cpu_id_reads_family_and_model_apart_from_the_model_name(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    monkeypatch.setattr(_build, "Path", lambda _: info)
    assert _build.cpu_model() == "AMD EPYC"  # "model" is its own key, not a prefix of "model name"
    assert _build.cpu_id() == "AuthenticAMD family 25 model 17"
    assert {"avx512f", "avx512_bf16"} <= _build.cpu_flags()
    info.write_text("model name\t: Some CPU\n")
    assert _build.cpu_id() is None
