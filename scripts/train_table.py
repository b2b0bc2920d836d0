"""Turn the summary.json of `hybrid-engine train` into the README's default-run table.

    python scripts/train_table.py out/train/summary.json                 # print
    python scripts/train_table.py out/train/summary.json --readme README.md

The README keeps it between `<!-- bench:train:start -->` and `<!-- bench:train:end -->`.
"""

from __future__ import annotations

from bench_table import table_main


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


def main() -> None:
    table_main(__doc__, table, "train")


if __name__ == "__main__":
    main()
