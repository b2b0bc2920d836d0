import os
import subprocess
import sys

import pytest

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


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C.. compiler .* and ninja"):
        _build._check_toolchain()


def test_second_import_does_not_rebuild():
    # A fresh process loads the cached library: no compiler message, and well under a build's time.
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", "import time; t = time.time(); import hybrid_engine; "
                          "print(round(time.time() - t, 2))"], capture_output=True, text=True, env=env, check=True)
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
