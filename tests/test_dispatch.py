"""The measured dispatch of decode_linear and bf16 prefill attention (ops/dispatch.py): every route gives the
reference's results within the op's tolerance; the calibration is cached and a second process reads it without
measuring; a damaged or foreign cache is ignored with a warning and measured again; HYBRID_ENGINE_CALIBRATE=0 keeps
the defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TOLERANCES

from hybrid_engine.ops import dispatch
from hybrid_engine.ops.attention import prefill_attention, prefill_attention_reference
from hybrid_engine.ops.linear import decode_linear, decode_linear_reference

ALL_KERNEL = dispatch.Routes(0, dispatch.NEVER, dispatch.NEVER, amx_min_rows=dispatch.NEVER)
ALL_AMX = dispatch.Routes(0, dispatch.NEVER, dispatch.NEVER, amx_min_rows=1)  # the FMA kernel without AMX
ALL_TORCH = dispatch.Routes(dispatch.NEVER, dispatch.NEVER, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 70, 300])
@pytest.mark.parametrize("route", [ALL_KERNEL, ALL_AMX, ALL_TORCH], ids=["kernel", "amx", "torch"])
def test_every_route_gives_the_reference_results(dtype, rows, route):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    w = torch.randn(80, 96, generator=gen).to(dtype)
    b = torch.randn(80, generator=gen)
    with dispatch.routes(route):
        assert dispatch.current() == route
        out = decode_linear(x, w, b)
    torch.testing.assert_close(out, decode_linear_reference(x, w, b), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("sdpa", [0, 1])
def test_both_prefill_routes_give_the_reference_results(sdpa):
    gen = torch.Generator().manual_seed(sdpa)
    q, k, v = (torch.randn(3, h, 40, 64, generator=gen).bfloat16() for h in (4, 2, 2))
    lens = torch.tensor([40, 40, 33])
    with dispatch.routes(dispatch.Routes(prefill_sdpa_bf16=sdpa)):
        assert dispatch.current().prefill_sdpa_bf16 == sdpa
        out = prefill_attention(q, k, v, lens, 0.125)
    ref = prefill_attention_reference(q.float(), k.float(), v.float(), lens, 0.125)
    torch.testing.assert_close(out.float(), ref, **TOLERANCES[torch.bfloat16])
    assert (out[2, :, :7] == 0).all()  # the padded rows


@pytest.fixture
def small(monkeypatch, tmp_path):
    """A quick calibration (small weights) into a cache of its own; the process's routes restored after."""
    monkeypatch.setattr(dispatch, "K", 128)
    monkeypatch.setattr(dispatch, "WEIGHTS", 2)
    monkeypatch.setenv("HYBRID_ENGINE_CALIBRATION_FILE", str(tmp_path / "calibration.json"))
    monkeypatch.delenv("HYBRID_ENGINE_CALIBRATE", raising=False)
    dispatch.ensure()
    before, state = dispatch.current(), dict(dispatch._state)
    yield tmp_path / "calibration.json"
    dispatch._force(before)
    dispatch._state.update(state)


def test_a_damaged_or_foreign_cache_is_ignored_and_measured_again(small):
    small.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable calibration cache, ignored"):
        assert dispatch.calibrate()["source"] == "measured now"
    data = json.loads(small.read_text())
    assert data["key"] == dispatch.machine_key() and set(data["routes"]) == set(dispatch.DEFAULT.__dict__)
    data["key"]["cpu"] = "some other CPU"
    small.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="another machine or build, ignored"):
        assert dispatch.calibrate()["source"] == "measured now"
    assert dispatch.calibrate()["source"].startswith("cached")  # now it fits
    assert dispatch.current() == dispatch.Routes(**json.loads(small.read_text())["routes"])


def test_calibrate_0_keeps_the_defaults(small, monkeypatch):
    monkeypatch.setenv("HYBRID_ENGINE_CALIBRATE", "0")
    assert dispatch.calibrate()["source"] == "defaults"
    assert dispatch.current() == dispatch.DEFAULT
    assert not small.exists()


SCRIPT = """
import hybrid_engine.ops.dispatch as d
d.K, d.WEIGHTS = 128, 2
print(d.calibrate()["source"])
"""


def test_the_cache_survives_a_second_process_without_measuring(tmp_path):
    env = {**os.environ, "HYBRID_ENGINE_CALIBRATION_FILE": str(tmp_path / "calibration.json")}
    env.pop("HYBRID_ENGINE_CALIBRATE", None)
    sources = [subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
               .stdout.strip().splitlines()[-1] for _ in range(2)]
    assert sources[0] == "measured now"
    assert sources[1].startswith("cached")


def test_the_decision_rules():
    times = {1: (2.0, 1.0), 2: (1.0, 2.0), 4: (0.5, 0.1)}  # (kernel s, torch s)
    assert dispatch._torch_prefix((1, 2, 4), times) == 1  # torch won at 1 only, then lost: 4 does not count
    many = {8: (1, 2), 16: (3, 2), 32: (1, 2), 64: (3, 2)}
    assert dispatch._kernel_max((8, 16, 32, 64), many, floor=4) == 32  # one noisy loss at 16 is ignored
    assert dispatch._kernel_max((8, 16), {8: (3, 2), 16: (3, 2)}, floor=4) == 4
    amx = {8: (1, 2), 16: (2, 1), 32: (2, 1)}  # (FMA s, AMX s)
    assert dispatch._amx_min((8, 16, 32), amx) == 16  # AMX from 16 on
    assert dispatch._amx_min((8, 16, 32), {**amx, 32: (1, 2)}) == dispatch.NEVER  # lost at the largest


def test_each_thread_count_keeps_a_cache_of_its_own(monkeypatch):
    """torchrun ranks of one thread each and a 2-thread process on one machine do not overwrite one another's."""
    from hybrid_engine import _build

    monkeypatch.delenv("HYBRID_ENGINE_CALIBRATION_FILE", raising=False)
    threads = torch.get_num_threads()
    try:
        paths = []
        for n in (1, 2):
            torch.set_num_threads(n)
            paths.append(dispatch.cache_path())
    finally:
        torch.set_num_threads(threads)
    assert paths[0] != paths[1]
    assert all(p.parent == _build.build_directory() for p in paths)
    monkeypatch.setenv("HYBRID_ENGINE_CALIBRATION_FILE", "/some/where.json")
    assert str(dispatch.cache_path()) == "/some/where.json"
