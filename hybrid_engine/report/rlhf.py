"""Turn bench/results/rlhf.json (bench/bench_rlhf.py) into the README's RLHF table: ours against TRL (grpo, rloo)
and against the HF baseline PPO (ppo), and ours with its kernels off (ours-reference).
The README keeps it between `<!-- bench:rlhf:start -->` and `<!-- bench:rlhf:end -->`. Ratios are against the
baseline of the same algorithm and precision in the same run: TRL's trainer for grpo and rloo, the HF baseline PPO
(bench/hf_ppo.py, provider hf) for ppo.
"""

from __future__ import annotations

from hybrid_engine.report.tables import machine_line

BASELINE = {"grpo": "trl", "rloo": "trl", "ppo": "hf"}
"""The provider each algorithm's ratio is against (bench_rlhf.BASELINE)."""
COLOSSAL = ("Colossal-AI is not measured, because its latest release on the index (colossalai 0.5.0) pins "
            "torch<=2.5.1 and transformers==4.51.3 and its ColossalChat code is not in the package, so it cannot "
            "share this environment.")


def table(data: dict) -> str:
    rows = [b["extra_info"] for b in data["benchmarks"]]
    baselines = {(r["algo"], r["precision"]): r for r in rows if r["provider"] == BASELINE.get(r["algo"])}
    first = rows[0]
    s = first["settings"]
    lines = [machine_line(data["benchmarks"]) + ".",
             f"Model {first['params_M']}M parameters; {s['prompts']} prompts x {s['generations']} samples per step, "
             f"{s['completion']} new tokens, {s['steps']} steps (the first not timed); training in fp32 or under bf16 "
             "autocast, the same on both sides. The ratio is the baseline's step time over the row's: TRL's "
             "GRPOTrainer / RLOOTrainer for grpo and rloo, the HF baseline PPO (bench/hf_ppo.py: HF generate and "
             "eager PyTorch; TRL 1.16 has no PPO) for ppo. ours-reference is ours with its kernels off "
             "(use_backend(\"reference\")). " + COLOSSAL, "",
             "| algo | precision | provider | step s | samples/s | generated tokens/s | peak RSS MB | reward, first -> "
             "last step | vs baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = baselines.get((r["algo"], r["precision"]))
        ratio = f"{base['step_s'] / r['step_s']:.2f}x" if base else ""
        phases = ""
        if "generate_s" in r:
            phases = f" (generate {r['generate_s']:.2f}, score {r['experience_s']:.2f}, train {r['train_s']:.2f})"
        lines.append(f"| {r['algo']} | {r['precision']} | {r['provider']} | {r['step_s']:.2f}{phases} | "
                     f"{r['samples_per_s']:.1f} | "
                     f"{r['generated_tokens_per_s']:.0f} | {r['peak_rss_mb']} | {r['rewards'][0]:.3f} -> "
                     f"{r['rewards'][-1]:.3f} | {ratio} |")
    return "\n".join(lines)
