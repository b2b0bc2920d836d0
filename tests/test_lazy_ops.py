"""The compiled ops load on their first call, not at import (ops/_library.py): every command's --help works where
the ops cannot even be built, and the first call of an op in a fresh process loads them and registers their fake
and autograd implementations."""

import os
import subprocess
import sys
import textwrap

HELP_EVERYWHERE = textwrap.dedent("""
    import argparse, contextlib, io, sys
    import torch
    from hybrid_engine.commands.main import build_parser
    from hybrid_engine.ops import _library

    def commands(parser, prefix):
        yield prefix
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, prefix + [name])

    names = list(commands(build_parser(), []))
    for argv in names:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
            build_parser().parse_args(argv + ["--help"])
        assert out.getvalue().startswith("usage: hybrid-engine"), argv
    loaded = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("hybrid_engine::"))
    print(len(names), _library._state["loaded"], loaded)
""")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=300)


def test_every_help_works_without_the_ops_or_a_compiler(tmp_path):
    """A build directory with no build and no compiler to make one: a --help that loaded the ops would fail (or,
    with a compiler, build for a minute, or wait on another process's build lock)."""
    build = tmp_path / "build"
    proc = run_python(HELP_EVERYWHERE, HYBRID_ENGINE_BUILD_DIR=str(build), CXX=str(tmp_path / "no-compiler"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, loaded, names = proc.stdout.split(maxsplit=2)
    assert int(count) >= 10  # the top level, each command, and bench's own subcommands
    assert (loaded, names.strip()) == ("False", "[]")
    assert not build.exists()


def test_the_first_call_loads_the_ops_and_registers_their_fakes():
    code = textwrap.dedent("""
        import torch
        from hybrid_engine import ops
        from hybrid_engine.ops import _library
        before = _library._state["loaded"]
        x, w = torch.randn(3, 40, requires_grad=True), torch.randn(40)
        out = ops.rms_norm(x, w, 1e-6)
        torch.testing.assert_close(out, ops.rms_norm_reference(x, w, 1e-6), atol=1e-5, rtol=1e-5)
        out.sum().backward()  # the autograd formula was registered with the load
        with torch._subclasses.FakeTensorMode():  # and the fake implementation
            fake = ops.kernels().rms_norm(torch.empty(2, 8), torch.empty(8), 1e-6)[0]
        print(before, _library._state["loaded"], x.grad is not None, tuple(fake.shape))
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False True True (2, 8)"


def test_the_reference_backend_never_loads_the_ops(tmp_path):
    code = textwrap.dedent("""
        import torch
        from hybrid_engine import ops
        from hybrid_engine.ops import _library
        with ops.use_backend("reference"):
            ops.rms_norm(torch.randn(3, 8), torch.randn(8), 1e-6)
            ops.gae(torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5), 1.0, 0.95)
        print(_library._state["loaded"])
    """)
    proc = run_python(code, HYBRID_ENGINE_BUILD_DIR=str(tmp_path / "build"), CXX=str(tmp_path / "no-compiler"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
