"""Turn bench/bench_rlhf.py's JSON into the RLHF tables of docs/benchmarks.md, and rlhf.json into the README's
headline (`<!-- bench:rlhf_headline:start -->`: ours against each baseline, step time).

rlhf.json (`<!-- bench:rlhf:start -->`): ours against TRL (grpo, rloo) and against the HF baseline PPO (ppo), and
ours with its kernels off (ours-reference), in one process. rlhf_zero3.json (`<!-- bench:rlhf_zero3:start -->`): our
PPO under DeepSpeed ZeRO-3 on two ranks against the same with HF generate on the ZeRO-3 module (deepspeed), actor
full and LoRA. Ratios are against the row's baseline (its `baseline` field: the provider of the same algorithm,
precision and setup that is not ours) in the same run. rlhf_scaling.json (`<!-- bench:rlhf_scaling:start -->`): ours
against those baselines over model size and response length. rlhf_batch.json (`<!-- bench:rlhf_batch:start -->`):
the same over the samples per step. rlhf_curves.json (`<!-- bench:rlhf_curves:start -->`): the reward at every step
of longer runs, ours against the baselines (equal learning).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from hybrid_engine.commands.report.tables import machine_line

BASELINE = {"grpo": "trl", "rloo": "trl", "ppo": "hf"}
"""The baseline of each algorithm in one process, for rows that do not name theirs (older results)."""
COLOSSAL = ("Colossal-AI is not measured, because its latest release on the index (colossalai 0.5.0) pins "
            "torch<=2.5.1 and transformers==4.51.3 and its ColossalChat code is not in the package, so it cannot "
            "share this environment.")


def key(r: dict) -> tuple:
    """What a row's ratio holds equal: algorithm, precision, setup and, in the scaling and batch runs, model size,
    response length and prompts per step."""
    return r["algo"], r["precision"], r.get("setup", "single"), r.get("size"), r.get("completion"), r.get("prompts")


def ratios(rows: list[dict]) -> list[float | None]:
    """Each row's speed-up: its baseline's step time over its own (None where the run has no baseline)."""
    baselines = {key(r): r for r in rows if r["provider"] == r.get("baseline", BASELINE.get(r["algo"]))}
    return [baselines[key(r)]["step_s"] / r["step_s"] if key(r) in baselines else None for r in rows]


def samples_per_step(r: dict) -> int:
    """A row's samples per step: its prompts times the samples of each."""
    return r["settings"]["prompts"] * r["settings"]["generations"]


Axes = tuple[str, Callable[[dict], str]]
"""The columns that say where a row sits: their header, and the row's cells."""
SETUP: Axes = ("precision | setup", lambda r: f"{r['precision']} | {r.get('setup', 'single')}")
SCALING: Axes = ("params M | max new tokens | mean response tokens",
                 lambda r: f"{r['params_M']} | {r['completion']} | {r['mean_response_tokens']:.0f}")
BATCH: Axes = ("samples per step | mean response tokens",
               lambda r: f"{samples_per_step(r)} | {r['mean_response_tokens']:.0f}")


def _rows(data: dict, axes: Axes = SETUP) -> list[str]:
    """The table's rows: one per case, where it sits (`axes`), its phase split where reported and its ratio to its
    baseline."""
    rows = [b["extra_info"] for b in data["benchmarks"]]
    header, where = axes
    lines = [f"| algo | {header} | provider | step s | samples/s | generated tokens/s | peak RSS MB | reward, "
             "first -> last step | % of roofline: step (generate, score, train) | vs baseline |",
             "|---|" + "---|" * (header.count("|") + 1) + "---|---|---|---|---|---|---|---|"]
    for r, ratio in zip(rows, ratios(rows)):
        phases = ""
        if "generate_s" in r:
            phases = f" (generate {r['generate_s']:.2f}, score {r['experience_s']:.2f}, train {r['train_s']:.2f})"
        lines.append(f"| {r['algo']} | {where(r)} | {r['provider']} | "
                     f"{r['step_s']:.2f}{phases} | {r['samples_per_s']:.1f} | {r['generated_tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mb']} | {r['rewards'][0]:.3f} -> {r['rewards'][-1]:.3f} | {_roofline(r)} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return lines


def _roofline(r: dict) -> str:
    """The step's fraction of its roofline and its phases' (hybrid_engine/benchmarks/rlhf_roofline.py), in percent;
    blank in results from before they were recorded."""
    if "step_roofline_fraction" not in r:
        return ""
    phases = [r.get(f"{p}_roofline_fraction") for p in ("generate", "experience", "train")]
    split = "" if None in phases else " (" + ", ".join(f"{100 * f:.0f}" for f in phases) + ")"
    return f"{100 * r['step_roofline_fraction']:.0f}{split}"


def _table(data: dict, how: str, axes: Axes = SETUP) -> str:
    """The machine, the settings followed by `how` (what the table compares), and the rows. Settings that vary
    between the rows (the model, the response length, the batch) are left to `how` and the rows."""
    first = data["benchmarks"][0]["extra_info"]
    s = first["settings"]
    model = f"Model {first['params_M']}M parameters; " if axes is SETUP else ""
    length = f", {s['completion']} new tokens" if axes is SETUP else ""
    batch = (f"{s['generations']} samples per prompt" if axes is BATCH
             else f"{s['prompts']} prompts x {s['generations']} samples per step")
    settings = f"{model}{batch}{length}, {s['steps']} steps (the first not timed)"
    return "\n".join([machine_line(data["benchmarks"]) + ".", settings + how, "", *_rows(data, axes)])


def table(data: dict) -> str:
    """rlhf.json's table: every system in one process."""
    return _table(data, "; training in fp32 or under bf16 autocast, the same on both sides. The ratio is the "
                  "baseline's step time over the row's: TRL's GRPOTrainer / RLOOTrainer for grpo and rloo, the HF "
                  "baseline PPO (hybrid_engine/benchmarks/hf_ppo.py: HF generate and eager PyTorch; TRL 1.16 has no "
                  "PPO) for ppo. "
                  "ours-reference is ours with its kernels off (use_backend(\"reference\")). " + COLOSSAL)


def headline(data: dict) -> str:
    """rlhf.json in one row per algorithm and precision: the baseline's step time, ours (with its phases) and the
    ratio."""
    rows = [b["extra_info"] for b in data["benchmarks"]]
    first = rows[0]
    s = first["settings"]
    lines = [machine_line(data["benchmarks"]) + ".",
             f"Model {first['params_M']}M parameters; {s['prompts']} prompts x {s['generations']} samples per step, "
             f"{s['completion']} new tokens, one process. The baseline is TRL's GRPOTrainer / RLOOTrainer (trl) for "
             "grpo and rloo, the HF baseline PPO (hf: HF generate and eager PyTorch) for ppo.", "",
             "| algo | precision | baseline | baseline step s | ours step s (generate, score, train) "
             "| ours vs baseline |", "|---|---|---|---|---|---|"]
    baselines = {key(r): r for r in rows if r["provider"] == r.get("baseline", BASELINE.get(r["algo"]))}
    for r, ratio in zip(rows, ratios(rows)):
        if r["provider"] != "ours" or ratio is None:
            continue
        base = baselines[key(r)]
        phases = f" ({r['generate_s']:.2f}, {r['experience_s']:.2f}, {r['train_s']:.2f})" if "generate_s" in r else ""
        lines.append(f"| {r['algo']} | {r['precision']} | {base['provider']} | {base['step_s']:.2f} | "
                     f"{r['step_s']:.2f}{phases} | {ratio:.2f}x |")
    return "\n".join(lines)


def zero3_table(data: dict) -> str:
    """rlhf_zero3.json's table: our PPO against DeepSpeed without a hybrid engine, two ranks under ZeRO-3."""
    return _table(data, ", across 2 torchrun ranks (gloo, one thread each; each rank takes half the prompts) under "
                  "DeepSpeed ZeRO-3, fp32. Both sides run the same train_ppo: the actor and critic train under "
                  "ZeRO-3 and score alike; only the actor's generation differs. deepspeed generates with HF generate "
                  "on the ZeRO-3 module, its hooks fetching the partitioned weights at every step (with LoRA, peft's "
                  "adapters unmerged: hybrid_engine/benchmarks/ds_generate.py); ours switches the engine into its "
                  "generation mode. "
                  "zero3-lora puts peft LoRA (r 16, q_proj and v_proj) on the actor. Peak RSS is both ranks' "
                  "together. The ratio is deepspeed's step time over the row's.")


def scaling_table(data: dict) -> str:
    """rlhf_scaling.json's table: ours against each algorithm's baseline over model size and response length."""
    rounds = data["benchmarks"][0]["extra_info"].get("rounds", 1)
    how = f"the faster of {rounds} interleaved rounds" if rounds > 1 else "one round"
    return _table(data, f"; fp32, one process, {how}. Model sizes 10M, 50M and 125M parameters (hidden 384 x 6 "
                  "layers, 512 x 16, 768 x 18, over the demo tokenizer's 246 tokens) at 32 new tokens, and 32 to 512 "
                  "new tokens at 10M (a response also ends at eos: the mean response column). The ratio is the "
                  "baseline's step time over the row's: TRL for grpo and rloo, the HF baseline for ppo.", SCALING)


def batch_table(data: dict) -> str:
    """rlhf_batch.json's table: ours against each algorithm's baseline over the samples per step."""
    return _table(data, "; fp32, one process, the faster of two interleaved rounds, the 10M model (hidden 384 x 6 "
                  "layers) at 32 new tokens, with 2, 8 and 32 prompts a step. The ratio is the baseline's step time "
                  "over the row's at the same batch: TRL for grpo and rloo, the HF baseline for ppo.", BATCH)


CURVE_TAIL = 10
"""The curves table compares the mean reward of the last CURVE_TAIL steps."""


def _tail(rewards: list[float]) -> tuple[float, float]:
    """The mean of the last CURVE_TAIL rewards and its standard error."""
    tail = rewards[-CURVE_TAIL:]
    return statistics.mean(tail), statistics.stdev(tail) / len(tail) ** 0.5


def _seeds_tail(row: dict) -> tuple[float, float, list[float]]:
    """(mean, standard error, each seed's mean) of the last CURVE_TAIL rewards: the error is the seeds' spread where
    the row ran several seeds, else the steps' spread within its one run."""
    runs = row.get("rewards_by_seed") or [row["rewards"]]
    means = [_tail(r)[0] for r in runs]
    if len(means) == 1:
        return (*_tail(runs[0]), means)
    return statistics.mean(means), statistics.stdev(means) / len(means) ** 0.5, means


def curves_table(data: dict) -> str:
    """rlhf_curves.json's table: each run's reward at the start and over its last steps, against its baseline's."""
    rows = [b["extra_info"] for b in data["benchmarks"]]
    s = rows[0]["settings"]
    seeds = len(rows[0].get("rewards_by_seed") or [None])
    baselines = {r["algo"]: r for r in rows if r["provider"] == r["baseline"]}
    spread = (f"over {seeds} seeds (each the model's initialisation, the sampling and the prompts' order, the same "
              "on both sides), with the standard error of the seeds' means" if seeds > 1
              else "with its standard error over those steps")
    lines = [machine_line(data["benchmarks"]) + ".",
             f"Model {rows[0]['params_M']}M parameters; {s['prompts']} prompts x {s['generations']} samples per step, "
             f"{s['completion']} new tokens, {s['steps']} steps at lr {s['lr']:g}, fp32, one process; the rule score "
             f"as the reward. The last-{CURVE_TAIL} mean is given {spread}; the difference is the row's mean less "
             "its baseline's, in their combined standard errors (within +-2: the same learning within noise). "
             "bench/rlhf_curves.png plots every step (the seeds' mean).", "",
             f"| algo | provider | step s | reward, first step | reward, mean of the last {CURVE_TAIL} | each seed's "
             "| difference from the baseline (standard errors) | vs baseline (speed) |", "|---" * 8 + "|"]
    for r, ratio in zip(rows, ratios(rows)):
        mean, err, per_seed = _seeds_tail(r)
        base = _seeds_tail(baselines[r["algo"]]) if r["algo"] in baselines else None
        diff = "" if base is None or r is baselines[r["algo"]] else \
            f"{(mean - base[0]) / max((err**2 + base[1]**2) ** 0.5, 1e-12):+.1f}"
        lines.append(f"| {r['algo']} | {r['provider']} | {r['step_s']:.2f} | {r['rewards'][0]:.3f} | {mean:.3f} +- "
                     f"{err:.3f} | {', '.join(f'{m:.3f}' for m in per_seed)} | {diff} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)
