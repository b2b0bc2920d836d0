"""frozen_zero3.json's table (`<!-- bench:frozen_zero3:start -->`, bench/bench_frozen.py): memory per rank of a PPO run
under ZeRO-3 on 2 ranks, with the frozen reference and reward model whole on every rank or partitioned across them."""

from __future__ import annotations

from hybrid_engine.commands.report.tables import machine_line

MB = 2**20
COLUMNS = ("frozen models", "freed memory", "rank", "frozen MB", "gathered MB", "RSS built MB", "RSS MB",
           "step peak RSS MB", "score s", "step s")
WHAT = ("as actor, critic, reference and reward model; PPO under ZeRO-3 on {world} torchrun ranks (gloo, one thread "
        "each), 2 prompts per rank, 16 new tokens, fp32. Frozen MB: the reference's and the reward model's parameters "
        "this rank holds, of both whole. Gathered MB: the most one partitioned frozen model gathers at once while "
        "scoring (its embeddings, final norm and LM head, and two blocks; computed). Freed memory: kept in the process "
        "(keep_freed_memory, the default) or returned to the OS (malloc's default). RSS: the process's resident memory "
        "once the models are built (freed pages returned), after the first step, and its peak during the second "
        "(VmHWM, reset between them). Times: the second step's "
        "score phase and its three phases together, on a shared machine.")


def _row(rank: dict) -> str:
    cells = [rank["mode"], "kept" if rank["keep_freed_memory"] else "returned", rank["rank"],
             f"{rank['frozen_bytes'] / MB:.1f} of {rank['whole_bytes'] / MB:.1f}",
             f"{rank['gather_bytes'] / MB:.1f}" if "gather_bytes" in rank else "-",
             f"{rank['build_rss_mb']:.0f}", f"{rank['rss_mb']:.0f}", f"{rank['step_peak_rss_mb']:.0f}",
             f"{rank['experience_s']:.2f}",
             f"{rank['generate_s'] + rank['experience_s'] + rank['train_s']:.2f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(data: dict) -> str:
    """One row per run and rank: the frozen models' parameters held, the most gathered at once, resident memory."""
    benchmarks = data["benchmarks"]
    first = benchmarks[0]["extra_info"]["ranks"][0]
    lines = [machine_line(benchmarks), "",
             f"Llama of {first['params'] / 1e6:.1f}M parameters (hidden {first['hidden']} x {first['layers']} layers) "
             + WHAT.format(world=first["world"]), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for bench in benchmarks:
        lines += [_row(rank) for rank in bench["extra_info"]["ranks"]]
    return "\n".join(lines)
