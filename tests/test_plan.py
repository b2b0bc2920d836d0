"""The memory planner (hybrid_engine/rlhf/plan/): its model shapes against the built models and the published
parameter counts, its ZeRO arithmetic against the formulas, the command, the docs' tables, and (slow) its estimates
against peaks measured by bench/plan_check.py's worker."""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_engine.commands.main import build_parser, main
from hybrid_engine.commands.plan import grid
from hybrid_engine.model.presets import preset_model
from hybrid_engine.rlhf.plan import PlanConfig, plan
from hybrid_engine.rlhf.plan import memory as m
from hybrid_engine.rlhf.plan.shapes import model_shape

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import plan_check  # noqa: E402


@pytest.mark.parametrize("preset", ["llama-tiny", "llama-20m"])
def test_the_shape_counts_every_weight_of_the_built_model(preset):
    model = preset_model(preset)
    shape = model_shape(preset)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.tied == model.config.tie_word_embeddings
    assert shape.block_params() == sum(p.numel() for p in model.model.layers[0].parameters())


def test_known_sizes_have_the_published_parameter_counts():
    assert model_shape("7b").params == 6_738_415_616  # LLaMA-7B
    assert model_shape("13b").params == 13_015_864_320  # LLaMA-13B
    assert model_shape("70b").params == 68_976_648_192  # Llama 2 70B
    assert model_shape("66b").tensors == model_shape("65b").tensors


def test_lora_weights_are_r_times_in_plus_out_of_each_target():
    shape = model_shape("llama-tiny")  # hidden 64, 4 heads of 16, 2 KV heads, 2 layers
    assert shape.lora_params(8, ("q_proj", "v_proj")) == 2 * 8 * ((64 + 64) + (64 + 32))


def test_zero_partitions_as_deepspeed_does():
    shape = model_shape("llama-20m")
    P, N = shape.params, 4
    actor = m.Trained(shape)
    bf16 = dict(model="llama-20m", world_size=N, weight_dtype="bf16")
    stage = {s: PlanConfig(**bf16, zero_stage=s) for s in range(4)}
    assert m.optimizer(actor, stage[0]) == 12 * P  # fp32 master and two moments
    assert m.optimizer(actor, stage[1]) == 12 * math.ceil(P / N)
    assert m.weights(actor, stage[2]) == 2 * P
    # ZeRO-2's gradient partition holds every weight that overlaps the rank's 1/N whole: rank 2's starts inside the
    # 12.3M-weight embedding and ends inside the blocks, so it holds the embedding and every block weight up to its end
    ends = list(itertools.accumulate(t.numel for t in shape.tensors))
    share = math.ceil(P / N)
    rank2 = ends[bisect.bisect_left(ends, 3 * share)] if 3 * share < P else P
    assert m.gradients(actor, stage[2]) == 2 * max(rank2, ends[0])
    assert m.weights(actor, stage[3]) == 2 * sum(t.numel if t.numel < 100_000 else math.ceil(t.numel / N)
                                                 for t in shape.tensors)
    fp32 = PlanConfig(model="llama-20m", world_size=1, zero_stage=0, weight_dtype="fp32")
    assert m.optimizer(actor, fp32) == 8 * P  # no master copy: the weights are fp32
    # the tied embedding (32000 x 384): the LM head's and the embedding's gradients and their sum at once, the sum
    # being the .grad under ZeRO 0-1 and a tensor beside DeepSpeed's gradient partition under ZeRO 2-3
    tied = 32000 * 384 * 2
    for s, copies in ((0, 2), (2, 3)):
        transient = m.gradients(actor, stage[s]) - m.resident_gradients(actor, stage[s])
        assert m.gradients_in_flight(actor, stage[s]) == transient + copies * tied


def test_frozen_partitioned_and_tensor_parallel_generation_shrink_their_parts():
    base = dict(model="13b", critic_model="350m", world_size=8)
    whole, split = plan(PlanConfig(**base)), plan(PlanConfig(**base, frozen_partitioned=True))
    ref = {p.name: {r.part: r.bytes for r in p.rows if r.model == "reference"} for p in (whole, split)[0].phases}
    assert ref["generation"]["weights (frozen)"] == 2 * model_shape("13b").params
    assert split.phases[2].total < whole.phases[2].total
    layer = plan(PlanConfig(**base, gather="layer", inference_tp_size=8))
    part = {r.part: r.bytes for r in layer.phases[2].rows if r.model == "actor"}
    shape = model_shape("13b")
    blocks = shape.layers * shape.block_params()
    embedding = 32000 * 5120  # the largest weight: gathered through an all-gather buffer of its size
    assert part["generation weights"] == 2 * (blocks // 8 + shape.block_params() + shape.params - blocks + embedding)


def test_the_command_prints_tables_and_json(capsys):
    assert main(["plan", "--model", "llama-tiny", "--world-size", "2", "--zero-stage", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["phase"] for p in out["phases"]] == ["sft", "reward", "generation", "ppo training"]
    for phase in out["phases"]:
        assert phase["total_bytes"] == sum(r["bytes"] for r in phase["rows"])
    assert out["config"]["weight_dtype"] == "bf16" and out["fits"]
    assert main(["plan", "--model", "13b", "--world-size", "8", "--device-memory-gib", "40"]) == 0
    text = capsys.readouterr().out
    assert "ppo training:" in text and text.strip().splitlines()[-1].startswith("does not fit: ")


@pytest.mark.parametrize("flags, message", [
    (["--model", "nonsense"], "not a known size"),
    (["--world-size", "6", "--inference-tp-size", "4"], "inference_tp_size must divide"),
    (["--weight-dtype", "int8"], "weight_dtype must be one of"),
])
def test_mistakes_are_refused_in_one_line(flags, message):
    with pytest.raises(ValueError, match=message):
        main(["plan", *flags])


def test_the_docs_tables_are_what_the_planner_prints():
    page = (ROOT / "docs" / "plan.md").read_text()
    found = re.findall(r"<!-- plan --grid (.*?) -->\n(.*?)\n<!-- /plan -->", page, re.S)
    assert len(found) >= 2
    for flags, table in found:
        args = build_parser().parse_args(["plan", "--grid", *shlex.split(flags)])
        assert table.strip() == grid(args.grid, args.world_sizes, args), flags


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["llama-tiny-1rank-zero0", "llama-tiny-2rank-zero3-gather-all"])
def test_estimates_are_within_15_percent_of_measured_peaks(name):
    case = next(c for c in plan_check.CASES if c["name"] == name)
    row = plan_check.rows(case, plan_check.measure(case))
    for phase, v in row["phases"].items():
        assert abs(v["error"]) <= plan_check.BOUND, (phase, v)


COUNTED = """
import sys, threading, torch
sys.path.insert(0, {bench!r})
import plan_worker
counter = plan_worker.allocation_counter()
counter.install()
start = counter.allocated()
counter.reset_peak()
kept = [torch.empty(1000, dtype=torch.float64)]
held = counter.allocated() - start
thread = threading.Thread(target=kept.pop)  # its last reference dropped on another thread, as gloo's Work does
thread.start()
thread.join()
print(held, counter.allocated() - start, counter.peak() - start)
"""


@pytest.mark.slow
def test_the_allocation_counter_takes_off_a_tensor_freed_on_another_thread():
    # in a process of its own: the counter stays installed over torch's CPU allocator until the process ends
    run = subprocess.run([sys.executable, "-c", COUNTED.format(bench=str(ROOT / "bench"))], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    held, after, peak = map(int, run.stdout.split()[-3:])
    assert (held, after, peak) == (8000, 0, 8000)


def test_the_committed_check_holds_every_case():
    results = json.loads((ROOT / "bench" / "results" / "plan_check.json").read_text())
    assert {r["case"] for r in results["cases"]} == {c["name"] for c in plan_check.CASES}
    for r in results["cases"]:  # the estimates in the file are the planner's of today
        case = next(c for c in plan_check.CASES if c["name"] == r["case"])
        assert {p: v["estimate_bytes"] for p, v in r["phases"].items()} == plan_check.estimate(case)


