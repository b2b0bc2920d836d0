"""The measured dispatch of decode_linear and bf16 prefill attention (ops/dispatch.py): every route gives the
reference's results within the op's tolerance; the calibration is cached and a second process reads it without
measuring; a damaged or foreign cache is ignored with a warning and measured again; HYBRID_ENGINE_CALIBRATE=0 keeps
the defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict, replace

import pytest
import torch
from helpers import TOLERANCES

from hybrid_engine.commands.env import calibration_rows
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
    with warnings.catch_warnings():  # this process's own calibration, under load or not
        warnings.simplefilter("ignore")
        dispatch.ensure()
    before, state = dispatch.current(), dict(dispatch._state)
    yield tmp_path / "calibration.json"
    dispatch._force(before)
    dispatch._state.update(state)


@pytest.fixture
def any_load(monkeypatch):
    """No calibration judged taken under load: the real measurements of these tests run on a busy machine too."""
    monkeypatch.setattr(dispatch, "FAR_BELOW", 0.0)
    monkeypatch.setattr(dispatch, "MIN_CPU_SHARE", 0.0)


def test_a_damaged_or_foreign_cache_is_ignored_and_measured_again(small, any_load):
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
d.FAR_BELOW = d.MIN_CPU_SHARE = 0.0  # never judged under load (the machine may be busy)
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
    monkeypatch.setattr(_build, "cpu_model", lambda: "another CPU")  # a node sharing the home directory
    assert dispatch.cache_path() not in paths and dispatch.cache_path().parent == paths[0].parent
    monkeypatch.setenv("HYBRID_ENGINE_CALIBRATION_FILE", "/some/where.json")
    assert str(dispatch.cache_path()) == "/some/where.json"


# -- robust calibration: interleaved races, best of the rounds, no final cache under load -----------------------


def test_races_interleave_the_sides_and_keep_the_best_of_each(monkeypatch):
    """A recording fake timer: one warm-up each, then A B A B ...; the fastest timed run of each side is kept."""
    now, order = [0.0], []
    runs = {"A": [9.0, 5.0, 3.0, 4.0, 6.0, 8.0], "B": [0.5, 2.0, 7.0, 1.0, 9.0, 2.5]}  # warm-up first

    def side(name):
        def run():
            order.append(name)
            now[0] += runs[name].pop(0)
        return run

    monkeypatch.setattr(dispatch, "clock", lambda: now[0])
    assert dispatch._interleaved_best([side("A"), side("B")], rounds=5) == [3.0, 1.0]  # B's faster warm-up not kept
    assert order == ["A", "B"] * 6


def test_each_race_and_the_roofline_go_through_the_interleaved_timer(monkeypatch, small):
    calls = []

    def fake(fns, rounds=5):
        calls.append(len(fns))
        for fn in fns:
            fn()
        return [2.0, 1.0]

    monkeypatch.setattr(dispatch, "_interleaved_best", fake)
    weights = [torch.randn(dispatch.K, dispatch.K) for _ in range(2)]
    assert dispatch._race(weights, 3, widen=False) == (2.0, 1.0)
    assert dispatch._race([w.bfloat16() for w in weights], 3, widen=True) == (2.0, 1.0)
    assert dispatch._race_prefill() == (2.0, 1.0)
    rates = dispatch.roofline()
    assert rates["read_GBps"] == round(2**28 / 2.0 / 1e9, 1) and rates["matmul_GFLOPps"] == round(2 * 2**30 / 1e9, 1)
    assert calls == [2, 2, 2, 2]


def _fake_measurements(monkeypatch, *runs):
    """dispatch.measure() returns these (read GB/s, matmul GFLOP/s, CPU share) in turn, each with routes of its own
    (fp32_kernel_max_rows = 100 + its index); a measurement past the last fails the test."""
    pending = list(enumerate(runs))

    def measure():
        assert pending, "measured when the cache should have been read"
        i, (read, matmul, share) = pending.pop(0)
        return {"format": dispatch.FORMAT, "key": dispatch.machine_key(), "amx": False, "cpu_share": share,
                "routes": asdict(replace(dispatch.DEFAULT, fp32_kernel_max_rows=100 + i)),
                "roofline": {"read_GBps": read, "matmul_GFLOPps": matmul}, "timings_ms": {}}

    monkeypatch.setattr(dispatch, "measure", measure)
    return pending


def test_a_calibration_under_load_is_used_but_measured_again_next_run(small, monkeypatch):
    pending = _fake_measurements(monkeypatch, (28.0, 165.0, 0.2), (28.0, 53.8, 0.9), (27.0, 160.0, 0.9))
    with pytest.warns(UserWarning, match=r"under load \(it got 20% of \d+ threads' CPU time\)"):
        first = dispatch.calibrate()  # a fresh machine: no best yet, the CPU share tells
    assert dispatch.current().fp32_kernel_max_rows == 100  # used by this process
    assert json.loads(small.read_text())["provisional"] is True
    with pytest.warns(UserWarning, match=r"under load \(matmul 53.8 GFLOP/s vs best 165.0\)"):
        second = dispatch.calibrate()  # measured again: the roofline is far below the best kept
    assert first["source"].startswith("calibration taken under load") and "measured again next run" in second["source"]
    cached = json.loads(small.read_text())
    assert cached["provisional"] is True and cached["best_roofline"] == {"read_GBps": 28.0, "matmul_GFLOPps": 165.0}
    assert dispatch.calibrate()["source"] == "measured now"  # 27 of 28 GB/s: quiet, cached as final
    assert dispatch.calibrate()["source"].startswith("cached") and not pending
    assert dispatch.current().fp32_kernel_max_rows == 102
    assert json.loads(small.read_text())["provisional"] is False


def test_a_forced_calibration_is_cached_under_load(small, monkeypatch):
    _fake_measurements(monkeypatch, (28.0, 165.0, 0.9), (16.9, 53.8, 0.9))
    assert dispatch.calibrate()["source"] == "measured now"
    forced = dispatch.calibrate(force=True)
    assert forced["source"] == "measured now under load (matmul 53.8 GFLOP/s vs best 165.0), cached as forced"
    assert dispatch.calibrate()["source"].startswith("cached")
    cached = json.loads(small.read_text())
    assert cached["provisional"] is False and cached["routes"]["fp32_kernel_max_rows"] == 101
    assert cached["roofline"]["read_GBps"] == 16.9 and cached["best_roofline"]["read_GBps"] == 28.0


def test_the_load_rule():
    best = {"read_GBps": 28.0, "matmul_GFLOPps": 165.0}

    def run(read, matmul, share):
        return {"roofline": {"read_GBps": read, "matmul_GFLOPps": matmul}, "cpu_share": share}

    assert dispatch.under_load(run(14.0, 82.5, 0.5), best) is None  # half the best and half the CPU: still fine
    assert dispatch.under_load(run(13.9, 165.0, 1.0), best) == "read 13.9 GB/s vs best 28.0"
    assert dispatch.under_load(run(28.0, 53.8, 1.0), best) == "matmul 53.8 GFLOP/s vs best 165.0"
    assert dispatch.under_load(run(1.0, 1.0, 0.9), None) is None  # no best known: only the CPU share can tell
    assert dispatch.under_load(run(28.0, 165.0, 0.49), best).startswith("it got 49% of")


def test_env_says_a_calibration_was_taken_under_load(small, monkeypatch):
    _fake_measurements(monkeypatch, (28.0, 165.0, 0.9), (16.9, 53.8, 0.9), (16.9, 53.8, 0.9))
    dispatch.calibrate()
    small.write_text(small.read_text().replace('"provisional": false', '"provisional": true'))  # re-measured
    with pytest.warns(UserWarning, match="under load"):
        rows = dict(calibration_rows(force=False))
    assert rows["calibration"] == ("calibration taken under load (matmul 53.8 GFLOP/s vs best 165.0): used by this "
                                   "process only, measured again next run")
    assert rows["best on this machine"] == "read 28.0 GB/s, fp32 matmul 165.0 GFLOP/s"
    assert rows["CPU share while measuring"].startswith("90% of")
    assert dict(calibration_rows(force=True))["calibration"].endswith("cached as forced")
