"""`hybrid-engine bench report`: the benchmark tables and plots from the JSON the benchmarks wrote (report/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hybrid_engine.commands.report import TABLES, report


def cmd_bench_report(args: argparse.Namespace) -> int:
    """The tables of docs/ and the README, and the plots, from the benchmarks' JSON (report/)."""
    unknown = sorted(set(args.only or []) - set(TABLES))
    if unknown:
        raise SystemExit(f"--only: unknown results {unknown}; known: {sorted(TABLES)}")
    args.plots.mkdir(parents=True, exist_ok=True)
    for line in report(args.results, args.readme, args.plots, args.only, args.docs):
        print(line)
    return 0


def add_bench_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark reports (run the benchmarks with pytest bench/ --benchmark-only)")
    verbs = bench.add_subparsers(dest="bench_command", required=True)
    rep = verbs.add_parser("report", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help="turn the benchmarks' JSON into the markdown tables of docs/ and the README, "
                                "and PNG plots")
    rep.add_argument("--results", type=Path, default=Path("bench/results"),
                     help="the folder of JSON files the benchmarks wrote (kernels.json, generation.json, "
                          "train_step.json, engine.json, rlhf.json, train_summary.json); missing ones are skipped")
    out = rep.add_mutually_exclusive_group()
    out.add_argument("--docs", type=Path, default=None,
                     help="put each table between its <!-- bench:NAME:start/end --> markers in its page of this "
                          "folder, and the headline tables in the README.md beside it; without --docs or --readme "
                          "the tables are printed")
    out.add_argument("--readme", type=Path, default=None,
                     help="put only the tables whose markers this file has into it (the README's headline and "
                          "default-run tables), and warn of the others")
    rep.add_argument("--plots", type=Path, default=Path("bench"), help="where the PNG plots go")
    rep.add_argument("--only", nargs="+", metavar="NAME",
                     help="only these results (file stems, e.g. rlhf generation)")
    rep.set_defaults(func=cmd_bench_report)

