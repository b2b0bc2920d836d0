"""Packaging. `pip install -e .` (or a wheel) installs the Python package with its C++ and CUDA
sources (hybrid_engine/csrc/) and compiles nothing: the ops are JIT-compiled on first use.
`HYBRID_ENGINE_BUILD_OPS=1 pip install --no-build-isolation .` builds them ahead of time from the
same source and flag lists (hybrid_engine/_build.py)."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("HYBRID_ENGINE_BUILD_OPS") == "1":
    from torch.utils.cpp_extension import BuildExtension

    # Load _build.py alone: importing the package would JIT-load the ops it is about to build.
    spec = importlib.util.spec_from_file_location("_he_build", Path(__file__).parent / "hybrid_engine" / "_build.py")
    _build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_build)
    ext_modules = [_build.aot_extension()]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
