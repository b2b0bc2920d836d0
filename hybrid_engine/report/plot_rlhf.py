"""The RLHF benchmark's step time by phase, stacked, per system (bench/bench_rlhf.py's pytest-benchmark JSON).
plot() writes bench/rlhf_phases.png.

One panel per algorithm and precision; a bar per provider: generation, experience (reference, reward and critic
scoring) and training, where the provider reports them (ours, ours-reference, hf), else the whole step (TRL
reports no split).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASES = [("generate_s", "generation"), ("experience_s", "experience"), ("train_s", "training")]


def plot_phases(rows: list[dict], out: Path) -> None:
    panels = list(dict.fromkeys((r["algo"], r["precision"], r.get("setup", "single")) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
    colors = {label: f"C{i}" for i, (_, label) in enumerate(PHASES)}
    for ax, (algo, precision, setup) in zip(axes[0], panels):
        cases = [r for r in rows if (r["algo"], r["precision"], r.get("setup", "single")) == (algo, precision, setup)]
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
