"""A pytest-benchmark JSON file as the README's markdown table (kernels, generation, the training step), the
machine line every table starts with, and the README's markers.

The README keeps each table between the markers `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`.
"""

from __future__ import annotations

import re
from pathlib import Path

COLUMNS = [  # (extra_info key, header, format)
    ("speedup_vs_eager", "vs eager", "{:.2f}x"),
    ("speedup_vs_hf-fp32", "vs HF fp32", "{:.2f}x"),
    ("speedup_vs_none-finish", "vs none finish", "{:.2f}x"),
    ("speedup_vs_hf", "vs HF", "{:.2f}x"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("GBps", "GB/s", "{:.1f}"),
    ("GFLOPps", "GFLOP/s", "{:.1f}"),
    ("roofline_fraction", "of roofline", "{:.0%}"),
    ("roofline_fraction_paired", "of roofline beside it", "{:.0%}"),
    ("peak_memory_MB", "peak MB", "{:.0f}"),
    ("memory_ratio_vs_eager", "memory vs eager", "{:.1f}x lower"),
    ("logprob_diff_max", "log-prob diff, max", "{:.4f}"),
    ("logprob_diff_mean", "log-prob diff, mean", "{:.5f}"),
]


def machine_line(benchmarks: list[dict]) -> str:
    # The roofline figures that the fractions in the table were computed against.
    with_roofline = [b for b in benchmarks if "roofline_fraction" in b["extra_info"]]
    info = (with_roofline or benchmarks)[0]["extra_info"] if benchmarks else {}
    units = info.get("cpu_units")
    units = None if units is None else ("no AMX, no avx512_bf16" if not {"amx_bf16", "avx512_bf16"} & set(units)
                                        else " + ".join(u for u in units if u != "avx512_vnni"))
    cpu = info.get("cpu", "?") + (f" ({info['cpu_id']})" if info.get("cpu_id") else "")
    parts = [cpu, info.get("capability", ""), units, f"{info.get('threads', '?')} threads",
             f"torch {info.get('torch', '?')}", f"read {info.get('read_GBps', '?')} GB/s",
             f"fp32 matmul {info.get('matmul_GFLOPps', '?')} GFLOP/s"]
    if "gpu" in info:
        parts.insert(0, info["gpu"])
    return "Machine: " + ", ".join(p for p in parts if p)


def table(data: dict) -> str:
    benchmarks = data["benchmarks"]
    used = [c for c in COLUMNS if any(c[0] in b["extra_info"] for b in benchmarks)]
    header = ["benchmark", "provider", "median ms"] + [c[1] for c in used]
    lines = [machine_line(benchmarks), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in sorted(benchmarks, key=lambda b: (b["group"] or "", b["name"])):
        info = b["extra_info"]
        provider = str(info.get("provider", b["param"] or ""))
        row = [b["group"] or b["name"], provider, f"{b['stats']['median'] * 1e3:.3f}"]
        row += [fmt.format(info[key]) if key in info else "" for key, _, fmt in used]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def replace_in_readme(readme: Path, name: str, text: str) -> None:
    """Puts `text` between README's `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` markers."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    content = readme.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    content = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", content,
                     flags=re.S)
    readme.write_text(content)
