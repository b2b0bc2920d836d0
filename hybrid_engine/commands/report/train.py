"""The summary.json of `hybrid-engine train` (bench/results/train_summary.json) as the default-run table in README.md
(marker `bench:train`)."""

from __future__ import annotations


def table(summary: dict) -> str:
    m = summary["machine"]
    times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["step_wall_s"].items())
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}. "
             f"Wall time {summary['wall_s']:.0f} s ({times}).", "",
             "| step | figure | before | after |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['figure']} | {r['before']} | {r['after']} |" for r in summary["table"]]
    lines += ["", f"PPO's old log-probs: {summary['ppo_logprobs']}."]
    if summary["goals"]:
        lines += ["", "| goal of the built-in default | met |", "|---|---|"]
        lines += [f"| {g['goal']} | {'yes' if g['met'] else '**no**'} |" for g in summary["goals"]]
    return "\n".join(lines)
