"""Plots of the generation benchmark (bench/bench_generate.py) from its pytest-benchmark JSON: plot() writes
bench/generation_tokens_per_s.png (tokens/s against batch size, one line per provider, one panel
per model and number of new tokens) and bench/decode_position.png (ms per token against position).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_throughput(rows: list[dict], out: Path) -> None:
    panels: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for b in rows:
        info = b["extra_info"]
        if b["name"].startswith("test_generate["):
            panels[(info["model"], info["new_tokens"])][info["provider"]].append((info["batch"], info["tokens_per_s"]))
    if not panels:
        return
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for provider, points in sorted(panels[key].items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        ax.set(title=f"{key[0]}, {key[1]} new tokens", xlabel="batch size", ylabel="tokens/s", xscale="log",
               yscale="log")
        ax.set_xticks(sorted({p[0] for pts in panels[key].values() for p in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(machine_title(rows), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_position(rows: list[dict], out: Path) -> None:
    series = [b for b in rows if "ms_per_token_by_position" in b["extra_info"]]
    if not series:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in sorted(series, key=lambda b: (b["extra_info"]["batch"], b["extra_info"]["provider"])):
        info = b["extra_info"]
        pts = info["ms_per_token_by_position"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{info['provider']} B={info['batch']}")
    ax.set(title=f"decode step cost by position ({series[0]['extra_info']['model']})", xlabel="position",
           ylabel="ms per step", ylim=(0, None))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(machine_title(rows), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def machine_title(rows: list[dict]) -> str:
    info = rows[0]["extra_info"]
    return f"{info.get('cpu', '')}, {info.get('capability', '')}, {info.get('threads', '?')} threads"


def plot(data: dict, out_dir: Path) -> list[Path]:
    """Both plots of the generation benchmark's JSON, into out_dir."""
    rows = data["benchmarks"]
    outs = [out_dir / "generation_tokens_per_s.png", out_dir / "decode_position.png"]
    plot_throughput(rows, outs[0])
    plot_position(rows, outs[1])
    return outs
