"""bench/results/engine.json (bench/bench_engine.py) as the engine tables (marker `bench:engine`: targets and phases)
and the README's headline (marker `bench:engine_headline`: the targets)."""

from __future__ import annotations

from hybrid_engine.commands.report.tables import machine_line

TARGETS = [  # (variant, ratio key, what, target, higher is better)
    ("full", "generation_speedup_vs_hf-zero3", "generation vs HF generate on the ZeRO-3 module", 3.0, True),
    ("lora", "generation_speedup_vs_hf-zero3", "generation vs HF generate on the ZeRO-3 + peft module", 15.0, True),
    ("full", "bf16_speedup", "bf16 generation weights vs fp32", 1.3, True),
    ("full", "ours_vs_single_process", "generation phase (switch included) / single-process generate", 1.15, False),
    ("lora", "ours_vs_single_process", "the same with LoRA", 1.15, False),
    ("full", "switch_fraction_of_step", "switch in + out, fraction of the step", 0.05, False),
    ("full-real-gather", "switch_fraction_of_step", "the same with stage3_max_live_parameters=0", 0.05, False),
    ("lora", "switch_fraction_of_step", "the same with LoRA", 0.05, False),
    ("full", "train_speedup_vs_deepspeed", "training step vs DeepSpeed alone (HF logits)", 1.0, True),
    ("lora", "train_speedup_vs_deepspeed", "the same with LoRA", 1.0, True),
]


def phases(benchmarks: list[dict]) -> list[str]:
    head = ["variant", "provider", "seconds", "tokens/s", "gather s", "fuse s", "build s", "release s",
            "gathered MB", "peak MB/rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in benchmarks:
        for name, p in b["extra_info"]["providers"].items():
            s = p.get("switch", {})
            tok = f"{p['tokens'] / p['seconds']:.0f}" if "tokens" in p else ""
            sw = [f"{s[k]:.3f}" if s else "" for k in ("gather_s", "fuse_s", "build_s", "release_s")]
            gathered = f"{s['gather_bytes'] / 2**20:.0f}" if s else ""
            lines.append(f"| {b['extra_info']['provider']} | {name} | {p['seconds']:.2f} | {tok} | " + " | ".join(sw)
                         + f" | {gathered} | {p['peak_MB']:.0f} |")
    return lines


def targets(benchmarks: list[dict]) -> list[str]:
    by_variant = {b["extra_info"]["provider"]: b["extra_info"] for b in benchmarks}
    lines = ["| target | variant | measured | goal | met |", "|---|---|---|---|---|"]
    for variant, key, what, goal, higher in TARGETS:
        value = by_variant.get(variant, {}).get(key)
        if value is None:
            continue
        met = value >= goal if higher else value <= goal
        fmt = "{:.1%}" if "fraction" in key else "{:.2f}x"
        goal_s = ("≥ " if higher else "≤ ") + fmt.format(goal)
        lines.append(f"| {what} | {variant} | {fmt.format(value)} | {goal_s} | {'yes' if met else '**no**'} |")
    return lines


def _setup(benchmarks: list[dict]) -> str:
    info = benchmarks[0]["extra_info"]
    return (f"{info['model']}, 2 ranks x 1 thread, ZeRO-3, {info['batch_per_rank']} prompts of {info['prompt']} "
            f"tokens per rank, {info['new_tokens']} new tokens, then one training step")


def tables(data: dict) -> str:
    benchmarks = data["benchmarks"]
    return "\n".join([machine_line(benchmarks), "", _setup(benchmarks), "", *targets(benchmarks), "",
                      *phases(benchmarks)])


def headline(data: dict) -> str:
    """The machine, the setup and the targets, without the phases."""
    benchmarks = data["benchmarks"]
    return "\n".join([machine_line(benchmarks), "", _setup(benchmarks), "", *targets(benchmarks)])
