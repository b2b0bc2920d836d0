"""Turn bench/results/rlhf.json (bench/bench_rlhf.py) into the README's RLHF-vs-TRL table.

    python scripts/rlhf_table.py bench/results/rlhf.json                 # print
    python scripts/rlhf_table.py bench/results/rlhf.json --readme README.md

The README keeps it between `<!-- bench:rlhf:start -->` and `<!-- bench:rlhf:end -->`. Ratios are against TRL's
trainer of the same algorithm in the same run.
"""

from __future__ import annotations

from bench_table import machine_line, table_main


def table(data: dict) -> str:
    rows = [b["extra_info"] for b in data["benchmarks"]]
    trl = {(r["algo"], r["precision"]): r for r in rows if r["provider"] == "trl"}
    first = rows[0]
    s = first["settings"]
    lines = [machine_line(data["benchmarks"]) + ".",
             f"Model {first['params_M']}M parameters; {s['prompts']} prompts x {s['generations']} samples per step, "
             f"{s['completion']} new tokens, {s['steps']} steps (the first not timed); training in fp32 or under bf16 "
             "autocast, the same on both sides.", "",
             "| algo | precision | provider | step s | samples/s | generated tokens/s | peak RSS MB | reward, first -> "
             "last step | vs TRL |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = trl.get((r["algo"], r["precision"]))
        ratio = f"{base['step_s'] / r['step_s']:.2f}x" if base else ""
        phases = ""
        if "generate_s" in r:
            phases = f" (generate {r['generate_s']:.2f}, score {r['experience_s']:.2f}, train {r['train_s']:.2f})"
        lines.append(f"| {r['algo']} | {r['precision']} | {r['provider']} | {r['step_s']:.2f}{phases} | "
                     f"{r['samples_per_s']:.1f} | "
                     f"{r['generated_tokens_per_s']:.0f} | {r['peak_rss_mb']} | {r['rewards'][0]:.3f} -> "
                     f"{r['rewards'][-1]:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    table_main(__doc__, table, "rlhf")


if __name__ == "__main__":
    main()
