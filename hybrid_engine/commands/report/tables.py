"""A pytest-benchmark JSON file as a markdown table (kernels, generation, the training step), the headline tables of
the kernels and of generation, the machine line every table starts with, and the pages' markers.

A page (README.md, docs/*.md) keeps each table between the markers `<!-- bench:NAME:start -->` and
`<!-- bench:NAME:end -->`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

COLUMNS = [  # (extra_info key, header, format)
    ("speedup_vs_eager", "vs eager", "{:.2f}x"),
    ("speedup_vs_hf-fp32", "vs HF fp32", "{:.2f}x"),
    ("speedup_vs_none-finish", "vs none finish", "{:.2f}x"),
    ("speedup_vs_hf", "vs HF", "{:.2f}x"),
    ("speedup_vs_padded", "vs padded", "{:.2f}x"),
    ("padding_fraction", "padding", "{:.0%}"),
    ("micro_batches", "micro-batches", "{}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("GBps", "GB/s", "{:.1f}"),
    ("GFLOPps", "GFLOP/s", "{:.1f}"),
    ("roofline_fraction", "of roofline", "{:.0%}"),
    ("roofline_fraction_paired", "of roofline beside it", "{:.0%}"),
    ("experts_read_per_layer", "experts read/layer", "{:.2f}"),
    ("read_MB_per_token", "MB read/token", "{:.2f}"),
    ("dense_MB_per_token", "dense-equivalent MB/token", "{:.2f}"),
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


def _median(b: dict) -> float:
    return b["stats"]["median"]


def _span(values: list[float], fmt: str) -> str:
    """The range of `values` (one value alone), each written with `fmt`; blank when there are none."""
    if not values:
        return ""
    low, high = min(values), max(values)
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)} to {fmt.format(high)}"


def kernels_headline(data: dict) -> str:
    """kernels.json in one row per op: how many cases it was measured on, and over those cases the range of ours
    against its eager reference, against the fastest other provider of the same case, and of the roofline."""
    cases: dict[str, dict[str, dict]] = defaultdict(dict)  # case -> provider -> benchmark
    for b in data["benchmarks"]:
        cases[b["group"] or b["name"]][str(b["extra_info"].get("provider", b["param"]))] = b
    ops: dict[str, list[dict[str, dict]]] = defaultdict(list)
    for case, by_provider in cases.items():
        if "ours" in by_provider:
            ops[case.split()[0]].append(by_provider)
    lines = [machine_line(data["benchmarks"]), "",
             "| op | cases | ours vs eager | ours vs the fastest other provider | ours, of roofline |",
             "|---|---|---|---|---|"]
    for op, measured in sorted(ops.items()):
        ours = [c["ours"]["extra_info"] for c in measured]
        vs_eager = [i["speedup_vs_eager"] for i in ours if "speedup_vs_eager" in i]
        vs_best = [min(_median(b) for p, b in c.items() if p != "ours") / _median(c["ours"]) for c in measured
                   if len(c) > 1]
        roofline = [i["roofline_fraction"] for i in ours if "roofline_fraction" in i]
        lines.append(f"| {op} | {len(measured)} | {_span(vs_eager, '{:.2f}x')} | {_span(vs_best, '{:.2f}x')} | "
                     f"{_span(roofline, '{:.0%}')} |")
    return "\n".join(lines)


def generation_headline(data: dict) -> str:
    """generation.json's whole `generate` calls at the longest response measured, one row per model and batch:
    tokens/s of HF in fp32 and of ours with fp32 and bf16 weights, ours against HF, and the decode step's fraction
    of the roofline at the same batch."""
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)  # (model, batch) -> provider -> extra_info
    steps: dict[tuple, dict[str, dict]] = defaultdict(dict)
    generate = [b["extra_info"] for b in data["benchmarks"] if b["name"].startswith("test_generate[")]
    new = max(i["new_tokens"] for i in generate)
    for i in generate:
        if i["new_tokens"] == new:
            rows[(i["model"], i["batch"])][i["provider"]] = i
    for b in data["benchmarks"]:
        if (b["group"] or "").startswith("decode step"):
            steps[(b["extra_info"]["model"], b["extra_info"]["batch"])][b["extra_info"]["provider"]] = b["extra_info"]

    def cell(by: dict[str, dict], provider: str, key: str, fmt: str) -> str:
        return fmt.format(by[provider][key]) if key in by.get(provider, {}) else ""

    lines = [machine_line(data["benchmarks"]), "",
             f"`generate` of {new} new tokens, greedy, against HF `generate` with fp32 weights; the decode step's "
             "fraction of the roofline at the same batch.", "",
             "| model | batch | HF fp32 tok/s | ours fp32 tok/s | ours bf16 tok/s | ours fp32 vs HF | ours bf16 vs HF "
             "| decode step, ours fp32, of roofline | ours bf16, of roofline |",
             "|---|---|---|---|---|---|---|---|---|"]
    models = list(dict.fromkeys(model for model, _ in rows))  # in the order the run measured them
    for model, batch in sorted(rows, key=lambda k: (models.index(k[0]), k[1])):
        by, step = rows[(model, batch)], steps.get((model, batch), {})
        lines.append(" | ".join([
            f"| {model}", str(batch),
            *(cell(by, p, "tokens_per_s", "{:.0f}") for p in ("hf-fp32", "ours-fp32", "ours-bf16")),
            *(cell(by, p, "speedup_vs_hf-fp32", "{:.2f}x") for p in ("ours-fp32", "ours-bf16")),
            *(cell(step, p, "roofline_fraction", "{:.0%}") for p in ("ours-fp32", "ours-bf16"))]) + " |")
    return "\n".join(lines)


def replace_between_markers(page: Path, name: str, text: str) -> None:
    """Puts `text` between the page's `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` markers."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    content = page.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{page} has no {start} ... {end} markers")
    content = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", content,
                     flags=re.S)
    page.write_text(content)
