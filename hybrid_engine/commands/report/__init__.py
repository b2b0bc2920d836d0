"""`hybrid-engine bench report`: the README's tables and the plots, from the JSON the benchmarks wrote.

Each results file has its table (between the README's `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`
markers) and, for some, plots:

| file in bench/results | made by | README marker | plots |
|---|---|---|---|
| kernels.json | pytest bench/ (the kernel suites) | kernels | |
| generation.json | bench/bench_generate.py | generation | generation_tokens_per_s.png, decode_position.png |
| train_step.json | bench/bench_train.py | train_step | |
| engine.json | bench/bench_engine.py | engine | |
| rlhf.json | bench/bench_rlhf.py | rlhf | rlhf_phases.png |
| rlhf_zero3.json | bench/bench_rlhf.py -k zero3 | rlhf_zero3 | rlhf_zero3_phases.png |
| rlhf_scaling.json | bench/bench_rlhf.py -k scaling | rlhf_scaling | rlhf_scaling.png |
| rlhf_batch.json | bench/bench_rlhf.py -k batch | rlhf_batch | rlhf_batch.png |
| rlhf_curves.json | bench/bench_rlhf.py -k curve | rlhf_curves | rlhf_curves.png |
| train_summary.json | hybrid-engine train (its summary.json) | train | |
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from hybrid_engine.commands.report import engine, rlhf, tables, train

TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "kernels": ("kernels", tables.table),
    "generation": ("generation", tables.table),
    "train_step": ("train_step", tables.table),
    "engine": ("engine", engine.tables),
    "rlhf": ("rlhf", rlhf.table),
    "rlhf_zero3": ("rlhf_zero3", rlhf.zero3_table),
    "rlhf_scaling": ("rlhf_scaling", rlhf.scaling_table),
    "rlhf_batch": ("rlhf_batch", rlhf.batch_table),
    "rlhf_curves": ("rlhf_curves", rlhf.curves_table),
    "train_summary": ("train", train.table),
}
"""JSON file stem -> (README marker, table function)."""


def _plots(stem: str) -> Callable[[dict, Path], list[Path]] | None:
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


def report(results: Path, readme: Path | None = None, plots: Path | None = None,
           only: list[str] | None = None) -> list[str]:
    """Makes the table (and plots, into `plots`) of every known JSON file in `results`, or of those in `only`;
    puts each table into `readme` between its markers, or returns them for printing. Returns the lines to show."""
    shown = []
    for stem, (marker, make_table) in TABLES.items():
        path = results / f"{stem}.json"
        if (only and stem not in only) or not path.is_file():
            continue
        data = json.loads(path.read_text())
        text = make_table(data)
        if readme is not None:
            tables.replace_in_readme(readme, marker, text)
            shown.append(f"{path}: table -> {readme} ({marker})")
        else:
            shown += [f"## {path}", "", text, ""]
        plot = _plots(stem) if plots is not None else None
        if plot is not None:
            shown += [f"{path}: plot -> {out}" for out in plot(data, plots)]
    if not shown:
        raise SystemExit(f"no benchmark results in {results} (expected any of "
                         f"{', '.join(s + '.json' for s in TABLES)})")
    return shown
