"""`hybrid-engine bench report`: the tables of docs/ and the README, and the plots, from the JSON the benchmarks
wrote.

Each results file has its full table, written into its page between the `<!-- bench:NAME:start -->` and
`<!-- bench:NAME:end -->` markers, some a short headline table for the README, and some plots. PAGES says which
page holds which marker: the headlines and the default run's table are in README.md, the others in
docs/benchmarks.md.

| file in bench/results | made by | markers | plots (.png) |
|---|---|---|---|
| kernels.json | pytest bench/ (the kernel suites) | kernels (+ _headline) | |
| generation.json | bench/bench_generate.py | generation (+ _headline) | generation_tokens_per_s, decode_position |
| generation_families.json | BENCH_GENERATE_MODELS=olmo2-125m,... bench/bench_generate.py | generation_families | |
| generation_moe.json | bench/bench_moe.py | generation_moe | |
| generation_vllm.json | bench/generate_vs_vllm.py | generation_vllm | |
| train_step.json | bench/bench_train.py | train_step | |
| packing.json | bench/bench_packing.py | packing | |
| engine.json | bench/bench_engine.py | engine (+ _headline) | |
| rlhf.json | bench/bench_rlhf.py | rlhf (+ _headline) | rlhf_phases |
| rlhf_wallclock.json | bench/bench_rlhf.py -k "... and fp32" | rlhf_wallclock | |
| rlhf_zero3.json | bench/bench_rlhf.py -k zero3 | rlhf_zero3 | rlhf_zero3_phases |
| rlhf_scaling.json | bench/bench_rlhf.py -k scaling | rlhf_scaling | rlhf_scaling |
| rlhf_batch.json | bench/bench_rlhf.py -k batch | rlhf_batch | rlhf_batch |
| rlhf_curves.json | bench/bench_rlhf.py -k curve | rlhf_curves | rlhf_curves |
| rlhf_qwen3.json | BENCH_RLHF_FAMILY=qwen3 bench/bench_rlhf.py -k grpo | rlhf_qwen3 | |
| frozen_zero3.json | bench/bench_frozen.py --sweeps | frozen_zero3 | |
| rlhf_trl_cb.json | bench/bench_rlhf.py -k "... (ours] or trl] or trl-cb)" | rlhf_trl_cb | |
| train_summary.json | hybrid-engine train (its summary.json) | train | |
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from hybrid_engine.commands.report import engine, frozen, peers, rlhf, tables, train

TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "kernels": ("kernels", tables.table),
    "generation": ("generation", tables.table),
    "generation_families": ("generation_families", tables.table),
    "generation_moe": ("generation_moe", tables.table),
    "generation_vllm": ("generation_vllm", peers.generation_vllm_table),
    "train_step": ("train_step", tables.table),
    "packing": ("packing", tables.table),
    "engine": ("engine", engine.tables),
    "rlhf": ("rlhf", rlhf.table),
    "rlhf_wallclock": ("rlhf_wallclock", rlhf.table),
    "rlhf_zero3": ("rlhf_zero3", rlhf.zero3_table),
    "rlhf_scaling": ("rlhf_scaling", rlhf.scaling_table),
    "rlhf_batch": ("rlhf_batch", rlhf.batch_table),
    "rlhf_curves": ("rlhf_curves", rlhf.curves_table),
    "rlhf_qwen3": ("rlhf_qwen3", rlhf.table),
    "frozen_zero3": ("frozen_zero3", frozen.table),
    "rlhf_trl_cb": ("rlhf_trl_cb", rlhf.table),
    "train_summary": ("train", train.table),
}
"""JSON file stem -> (marker, table function): the full table."""

HEADLINES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "kernels": ("kernels_headline", tables.kernels_headline),
    "generation": ("generation_headline", tables.generation_headline),
    "engine": ("engine_headline", engine.headline),
    "rlhf": ("rlhf_headline", rlhf.headline),
}
"""JSON file stem -> (marker, table function): the README's headline table of that area."""

README = "README.md"
PAGES: dict[str, str] = {
    "kernels": "benchmarks.md",
    "generation": "benchmarks.md",
    "generation_families": "benchmarks.md",
    "generation_moe": "benchmarks.md",
    "generation_vllm": "benchmarks.md",
    "train_step": "benchmarks.md",
    "packing": "benchmarks.md",
    "engine": "benchmarks.md",
    "rlhf": "benchmarks.md",
    "rlhf_wallclock": "benchmarks.md",
    "rlhf_zero3": "benchmarks.md",
    "rlhf_scaling": "benchmarks.md",
    "rlhf_batch": "benchmarks.md",
    "rlhf_curves": "benchmarks.md",
    "rlhf_qwen3": "benchmarks.md",
    "frozen_zero3": "benchmarks.md",
    "rlhf_trl_cb": "benchmarks.md",
    "train": README,
    "kernels_headline": README,
    "generation_headline": README,
    "engine_headline": README,
    "rlhf_headline": README,
}
"""Marker -> the page that holds it: a page of the docs folder, or README (the README.md beside that folder)."""


def _plots(stem: str) -> Callable[[dict, Path], list[Path]] | None:
    # The plot modules are imported here, when a plot is made: they import matplotlib.pyplot (about 0.3 s) and set
    # its backend to Agg, which every `hybrid-engine` command would otherwise pay for and impose at start-up.
    if stem == "generation":
        from hybrid_engine.commands.report import plot_generation

        return plot_generation.plot
    if stem.startswith("rlhf"):
        from hybrid_engine.commands.report import plot_rlhf

        phases = {s: lambda data, out_dir, s=s: plot_rlhf.plot(data, out_dir, f"{s}_phases.png")
                  for s in ("rlhf", "rlhf_zero3")}
        return {**phases, "rlhf_scaling": plot_rlhf.plot_scaling, "rlhf_batch": plot_rlhf.plot_batch,
                "rlhf_curves": plot_rlhf.plot_curves}.get(stem)
    return None


def _pages(docs: Path | None, readme: Path | None) -> dict[str, Path] | None:
    """Marker -> the file it is written into: with `docs`, every marker of PAGES (README.md beside that folder);
    with `readme` alone, the markers that file has; None: print the tables."""
    if docs is not None:
        return {marker: docs.parent / README if page == README else docs / page for marker, page in PAGES.items()}
    if readme is not None:
        text = readme.read_text()
        return {marker: readme for marker in PAGES if f"<!-- bench:{marker}:start -->" in text}
    return None


def report(results: Path, readme: Path | None = None, plots: Path | None = None,
           only: list[str] | None = None, docs: Path | None = None) -> list[str]:
    """Makes the tables (and plots, into `plots`) of every known JSON file in `results`, or of those in `only`. With
    `docs`, puts each table between its markers in its page (PAGES); with `readme` alone, puts those tables whose
    markers that file has into it (the README's headline and default-run tables) and warns of the others; with
    neither, returns them for printing. Returns the lines to show."""
    pages = _pages(docs, readme)
    shown, elsewhere = [], []
    for stem, full in TABLES.items():
        path = results / f"{stem}.json"
        if (only and stem not in only) or not path.is_file():
            continue
        data = json.loads(path.read_text())
        for marker, make_table in [full, HEADLINES.get(stem)] if stem in HEADLINES else [full]:
            text = make_table(data)
            if pages is None:
                shown += [f"## {path} ({marker})", "", text, ""]
            elif marker in pages:
                tables.replace_between_markers(pages[marker], marker, text)
                shown.append(f"{path}: table -> {pages[marker]} ({marker})")
            else:
                elsewhere.append(marker)
        plot = _plots(stem) if plots is not None else None
        if plot is not None:
            shown += [f"{path}: plot -> {out}" for out in plot(data, plots)]
    if not shown:
        raise SystemExit(f"no benchmark results in {results} (expected any of "
                         f"{', '.join(s + '.json' for s in TABLES)})")
    if elsewhere:
        print(f"warning: {readme} has no markers for {', '.join(elsewhere)}: those tables live in docs/ "
              "(write every page with --docs docs)", file=sys.stderr)
    return shown
