"""Two "nodes" on this machine: two torchrun processes, each with its own node rank and one rank, meeting over
127.0.0.1 (gloo) as two machines would. `hybrid-engine ppo` under ZeRO-3 on two nodes (the rendezvous form of torchrun)
trains exactly as one torchrun of two ranks does, and a rank killed on one node (the static form) ends the run on both
nodes, the surviving node's output naming the rank that stopped. The deepspeed launcher's --local_rank, which it
passes before the command's name, is accepted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from demo_models import demo_llama, save_demo_llama
from test_cli_distributed import KILLER, ZERO, _free_port

from hybrid_engine.commands.main import build_parser
from hybrid_engine.rlhf import RewardModel

PPO = ["ppo", "--model", "start", "--reward-model", "rm0", "--ds-config", "z3.json", "--max-steps", "2",
       "--batch-size", "2", "--train-batch-size", "2", "--max-new-tokens", "8", "--demo", "--no-progress"]
FIGURES = ("policy_loss", "value_loss", "score", "kl", "entropy", "approx_kl")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    save_demo_llama(root / "start")
    RewardModel.from_model(demo_llama(seed=2)).save_pretrained(root / "rm0")
    (root / "z3.json").write_text(json.dumps(ZERO[3]))
    (root / "killer.py").write_text(KILLER)
    return root


def start(launcher: list[str], args: list[str], cwd, name: str) -> subprocess.Popen:
    """`torchrun LAUNCHER -m hybrid_engine.commands ARGS`, its output in cwd/<name>.log."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "hybrid_engine.commands", *args,
           "--cache-dir", str(cwd / f"cache-{name}")]
    log = open(cwd / f"{name}.log", "w")
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def finish(procs: dict[str, subprocess.Popen], cwd, timeout: float) -> dict[str, tuple[int, str, float]]:
    """Every process's (exit status, output, seconds from now to its end); one still running past `timeout` is killed
    and its status is None."""
    began, ended = time.monotonic(), {}
    while len(ended) < len(procs) and time.monotonic() - began < timeout:
        ended.update({n: time.monotonic() - began for n, p in procs.items() if n not in ended and p.poll() is not None})
        time.sleep(0.2)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    return {n: (p.returncode if n in ended else None, (cwd / f"{n}.log").read_text(), ended.get(n, float("inf")))
            for n, p in procs.items()}


def static(node: int, port: int) -> list[str]:
    """torchrun's flags for node `node` of 2, one rank each, node 0 at 127.0.0.1:port."""
    return ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(port)]


def rendezvous(port: int) -> list[str]:
    """torchrun's flags for one of 2 nodes, one rank each, meeting at the c10d rendezvous 127.0.0.1:port."""
    return ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "nodes-test"]


def _ok(result: tuple[int, str, float], what: str) -> None:
    if result[0] != 0:
        pytest.fail(f"{what} failed (exit status {result[0]}):\n{result[1][-6000:]}")


def test_the_deepspeed_launchers_local_rank_is_accepted():
    args = build_parser().parse_args(["--local_rank=1", "ppo", "--demo"])  # `deepspeed --module hybrid_engine...`
    assert args.local_rank == 1 and args.command == "ppo"


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_train_as_one_node_of_two_ranks(work):
    one = ["--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    port = _free_port()
    procs = {"one-node": start(one, [*PPO, "--output", "one"], work, "one-node")}
    procs.update({f"node{k}": start(rendezvous(port), [*PPO, "--output", "two"], work, f"node{k}") for k in (0, 1)})
    results = finish(procs, work, timeout=300)
    for name, result in results.items():
        _ok(result, name)
    assert sum(r[1].count("ppo summary") for r in results.values()) == 2  # global rank 0 of each run reports
    one_node, two_nodes = (json.loads((work / d / "summary.json").read_text()) for d in ("one", "two"))
    assert one_node["steps"] == two_nodes["steps"] == 2
    for a, b in zip(one_node["history"], two_nodes["history"], strict=True):
        # bit-equal: the same rows per rank, the same seeds, and gloo's sum of two ranks is the same either way
        assert {k: a[k] for k in FIGURES} == {k: b[k] for k in FIGURES}
    for file in ("model.safetensors", "critic/model.safetensors"):
        assert (work / "one" / file).read_bytes() == (work / "two" / file).read_bytes(), file


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_killed_on_one_node_ends_both_and_is_named(work):
    port = _free_port()
    args = [*PPO, "--output", "dead", "--reward-fn", "killer.py:score"]  # rank 1 kills itself at its second score
    results = finish({f"dead{k}": start(static(k, port), args, work, f"dead{k}") for k in (0, 1)}, work, timeout=180)
    (status0, out0, _), (status1, out1, _) = results["dead0"], results["dead1"]
    assert status0 not in (0, None) and status1 not in (0, None), (status0, status1, out0[-3000:], out1[-3000:])
    assert "rank      : 1" in out1 and "Signal 9 (SIGKILL)" in out1  # node 1's torchrun names its dead rank
    # node 0's torchrun names its own rank 0 as the first failure; our line names the rank that stopped first
    assert "hybrid_engine: rank 0 (node 0) ended on the error above after rank 1 (node 1, host " in out0, out0[-3000:]
    assert not (work / "dead" / "summary.json").exists()
