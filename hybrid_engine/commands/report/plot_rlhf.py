"""The RLHF benchmark's plots (bench/bench_rlhf.py's pytest-benchmark JSON): step time by phase, stacked, per system
(plot(): bench/rlhf_phases.png, bench/rlhf_zero3_phases.png), and the scaling runs' samples/s against model size and
step time against response length (plot_scaling(): bench/rlhf_scaling.png), the batch runs' samples/s and
speed-up against the samples per step (plot_batch(): bench/rlhf_batch.png), and the reward at every step of the
reward-curve runs (plot_curves(): bench/rlhf_curves.png).

One panel per algorithm and precision; a bar per provider: generation, experience (reference, reward and critic
scoring) and training, where the provider reports them (every provider since TRL's split was recorded), else the
whole step.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from hybrid_engine.commands.report.rlhf import ratios, samples_per_step  # noqa: E402

PHASES = [("generate_s", "generation"), ("experience_s", "experience"), ("train_s", "training")]


def _panel(r: dict) -> tuple:
    return r["algo"], r["precision"], r.get("setup", "single")


def plot_phases(rows: list[dict], out: Path) -> None:
    panels = list(dict.fromkeys(_panel(r) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
    colors = {label: f"C{i}" for i, (_, label) in enumerate(PHASES)}
    for ax, (algo, precision, setup) in zip(axes[0], panels):
        cases = [r for r in rows if _panel(r) == (algo, precision, setup)]
        for x, r in enumerate(cases):
            if all(key in r for key, _ in PHASES):
                bottom = 0.0
                for key, label in PHASES:
                    ax.bar(x, r[key], bottom=bottom, color=colors[label], label=label if x == 0 else None)
                    bottom += r[key]
                ax.bar(x, max(r["step_s"] - bottom, 0.0), bottom=bottom, color="0.8",
                       label="other" if x == 0 else None)
            else:
                ax.bar(x, r["step_s"], color="0.55", label="whole step (no split)")
        ax.set_xticks(range(len(cases)), [r["provider"] for r in cases], rotation=30, ha="right")
        title = f"{algo}, {precision}" + ("" if setup == "single" else f", {setup}")
        ax.set(title=title, ylabel="s per step")
        ax.grid(True, axis="y", alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.containers if not h.get_label().startswith("_")}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=110)


def plot(data: dict, out_dir: Path, name: str = "rlhf_phases.png") -> list[Path]:
    """The phase plot of the RLHF benchmark's JSON, into out_dir/name."""
    out = out_dir / name
    plot_phases([b["extra_info"] for b in data["benchmarks"]], out)
    return [out]


def plot_scaling(data: dict, out_dir: Path, name: str = "rlhf_scaling.png") -> list[Path]:
    """Two panels, a line per algorithm and provider: samples/s against parameters (at the shortest responses),
    and step time against max new tokens (at the smallest model)."""
    rows = [b["extra_info"] for b in data["benchmarks"]]
    shortest, smallest = min(r["completion"] for r in rows), min(r["params_M"] for r in rows)
    fig, (by_size, by_length) = plt.subplots(1, 2, figsize=(10, 4))
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    for line in dict.fromkeys((r["algo"], r["provider"]) for r in rows):
        style = dict(marker="o", color=f"C{algos.index(line[0])}", ls="-" if line[1].startswith("ours") else "--",
                     label=" ".join(line))
        mine = [r for r in rows if (r["algo"], r["provider"]) == line]
        sizes = sorted((r["params_M"], r["samples_per_s"]) for r in mine if r["completion"] == shortest)
        lengths = sorted((r["completion"], r["step_s"]) for r in mine if r["params_M"] == smallest)
        by_size.plot(*zip(*sizes), **style)
        if len(lengths) > 1:
            by_length.plot(*zip(*lengths), **style)
    by_size.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="samples/s",
                title=f"samples/s against model size ({shortest} new tokens)")
    by_length.set(xscale="log", yscale="log", xlabel="max new tokens", ylabel="s per step",
                  title=f"step time against response length ({smallest}M)")
    for ax, key in ((by_size, "params_M"), (by_length, "completion")):
        _log_ticks(ax, sorted({r[key] for r in rows}))
    by_size.legend(fontsize=8)
    fig.tight_layout()
    out = out_dir / name
    fig.savefig(out, dpi=110)
    return [out]


def _log_ticks(ax, ticks: list[float]) -> None:
    """Plain numbers at `ticks` on a log x axis, and on the y axis; a light grid."""
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)


def plot_batch(data: dict, out_dir: Path, name: str = "rlhf_batch.png") -> list[Path]:
    """Two panels over the samples per step: samples/s, a line per algorithm and provider, and ours' speed-up over
    its baseline, a line per algorithm."""
    rows = [b["extra_info"] for b in data["benchmarks"]]
    fig, (speed, gain) = plt.subplots(1, 2, figsize=(10, 4))
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    for line in dict.fromkeys((r["algo"], r["provider"]) for r in rows):
        style = dict(marker="o", color=f"C{algos.index(line[0])}", ls="-" if line[1].startswith("ours") else "--",
                     label=" ".join(line))
        mine = [r for r in rows if (r["algo"], r["provider"]) == line]
        speed.plot(*zip(*sorted((samples_per_step(r), r["samples_per_s"]) for r in mine)), **style)
    for algo in algos:
        points = sorted((samples_per_step(r), x) for r, x in zip(rows, ratios(rows))
                        if r["algo"] == algo and r["provider"] == "ours" and x is not None)
        if points:
            gain.plot(*zip(*points), marker="o", color=f"C{algos.index(algo)}", label=f"{algo}: ours / baseline")
    speed.set(xscale="log", xlabel="samples per step", ylabel="samples/s",
              title="samples/s against batch (10M, 32 new tokens)")
    gain.set(xscale="log", xlabel="samples per step", ylabel="speed-up (baseline step s / ours)",
             title="speed-up against batch")
    ticks = sorted({samples_per_step(r) for r in rows})
    for ax in (speed, gain):
        _log_ticks(ax, ticks)
    speed.legend(fontsize=8)
    gain.legend(fontsize=8)
    fig.tight_layout()
    out = out_dir / name
    fig.savefig(out, dpi=110)
    return [out]


def plot_curves(data: dict, out_dir: Path, name: str = "rlhf_curves.png") -> list[Path]:
    """One panel per algorithm: the reward at every step, ours and its baseline (the seeds' mean, and each seed's
    faintly where there are several)."""
    rows = [b["extra_info"] for b in data["benchmarks"]]
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    fig, axes = plt.subplots(1, len(algos), figsize=(4 * len(algos), 3.6), squeeze=False)
    for ax, algo in zip(axes[0], algos):
        for i, r in enumerate(r for r in rows if r["algo"] == algo):
            style = dict(color=f"C{i}", ls="-" if r["provider"].startswith("ours") else "--")
            ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], label=r["provider"], **style)
            for seed in r.get("rewards_by_seed") or []:
                ax.plot(range(1, len(seed) + 1), seed, alpha=0.25, lw=0.8, **style)
        ax.set(title=algo, xlabel="step", ylabel="mean reward")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = out_dir / name
    fig.savefig(out, dpi=110)
    return [out]
