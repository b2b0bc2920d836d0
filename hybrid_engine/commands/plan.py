"""`hybrid-engine plan`: what each rank holds in each phase of an RLHF run, and whether it fits (rlhf/plan/).

    hybrid-engine plan --model 13b --world-size 8 --zero-stage 3 --lora-r 0
    hybrid-engine plan --model out/sft --json
    hybrid-engine plan --grid 1.3b 6.7b 13b --world-sizes 8 16    # the table of docs/plan.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from hybrid_engine.commands.config_args import add_config_args, build_config
from hybrid_engine.model.dtypes import dtype_name
from hybrid_engine.rlhf.plan import Plan, PlanConfig, plan
from hybrid_engine.rlhf.plan.phases import GIB

GRID_SETTINGS = dict(critic_model="350m", zero_stage=3, weight_dtype="bf16", batch_size=4, prompt_len=256,
                     response_len=256, checkpointing=True, device_memory_gib=80.0)
"""The docs' grid: DeepSpeed-Chat's step 3 (a 350m critic and reward model, ZeRO-3, bf16, 256 + 256 tokens, batch 4
per GPU, activation checkpointing) on 80 GB GPUs."""


def add_plan_command(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-rank memory of each phase (SFT, reward, PPO generation and training) "
                              "of a run, and whether it fits; no model is built",
                              description="Estimates, per rank, the weights, gradients, optimizer state, DeepSpeed "
                              "buffers, activations, generation weights, KV cache and frozen models of each phase of "
                              "an RLHF run, and whether each fits --device-memory-gib. Checked against measured peaks "
                              "(bench/results/plan_check.json).")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    p.add_argument("--grid", nargs="+", metavar="MODEL", help="instead of one plan: a markdown table of these models "
                   "against --world-sizes, DeepSpeed-Chat's step-3 settings (the other flags override them), each "
                   "cell the largest phase's GiB per rank and whether it fits")
    p.add_argument("--world-sizes", nargs="+", type=int, default=[8, 16, 32, 64], metavar="N",
                   help="the grid's columns: GPU counts (default: 8 16 32 64)")
    add_config_args(p.add_argument_group("PlanConfig settings"), PlanConfig)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    if args.grid:
        print(grid(args.grid, args.world_sizes, args))
        return 0
    result = plan(build_config(PlanConfig, args))
    print(json.dumps(plan_dict(result), indent=1) if args.json else tables(result))
    return 0


def tables(result: Plan) -> str:
    """A table per phase (who, part, GiB, the phase's total against the device) and the verdict line."""
    lines = [f"plan: {result.config.describe()}",
             "weights: " + ", ".join(f"{who} {n / 1e9:.3g}B" for who, n in result.params.items())]
    for phase in result.phases:
        lines += ["", f"{phase.name}:"]
        lines += [f"  {r.model:<12} {r.part:<36} {r.bytes / GIB:10.2f} GiB" for r in phase.rows]
        mark = "fits" if phase.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<49} {phase.total / GIB:10.2f} GiB of {phase.capacity / GIB:g}: {mark}")
    return "\n".join([*lines, "", result.verdict()])


def plan_dict(result: Plan) -> dict:
    config = {k: dtype_name(v) if k.endswith("dtype") else v for k, v in dataclasses.asdict(result.config).items()}
    phases = [{"phase": p.name, "total_bytes": p.total, "fits": p.fits,
               "rows": [dataclasses.asdict(r) for r in p.rows]} for p in result.phases]
    return {"config": config, "params": result.params, "phases": phases, "fits": result.fits,
            "verdict": result.verdict()}


def grid(models: list[str], worlds: list[int], args: argparse.Namespace | None = None) -> str:
    """Markdown: a row per model, a column per world size; each cell the largest phase's GiB per rank, and ✓ or ✗."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(PlanConfig)}} \
        if args is not None else {}
    head = ["| model | params | " + " | ".join(f"{n} GPUs" for n in worlds) + " |",
            "|---|---|" + "---|" * len(worlds)]
    rows = []
    for model in models:
        cells, params = [], None
        for world in worlds:
            result = plan(PlanConfig(**{**GRID_SETTINGS, "model": model, **given, "world_size": world}))
            peak = max(p.total for p in result.phases) / GIB
            cells.append(f"{peak:.1f} {'✓' if result.fits else '✗'}")
            params = result.params["actor"]
        rows.append(f"| {model} | {params / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(head + rows)
