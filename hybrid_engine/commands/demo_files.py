"""`hybrid-engine demo-files`: an example input of every kind the RLHF commands read, written from the built-in demo
task into a folder, to read, copy and train on.

    hybrid-engine demo-files --output demo   # demo/model/, rows.jsonl, pairs.jsonl, prompts.jsonl, my_rules.py

model/ is a fresh demo model (rlhf.demo.DEMO_MODEL, random weights) saved with save_pretrained beside the demo
tokenizer; rows.jsonl, pairs.jsonl and prompts.jsonl are the first --rows rows of the demo's sft, reward and ppo
files (the rows `sft`, `reward` and `ppo` read); my_rules.py holds two reward functions of the --reward-fn form.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybrid_engine.commands.common import quiet_libraries
from hybrid_engine.rlhf.demo import DEMO_DIR, demo_model, demo_tokenizer

DATA_FILES = {"rows.jsonl": "sft", "pairs.jsonl": "reward", "prompts.jsonl": "ppo"}
"""Each example data file and the demo file (of the step that reads it) whose first rows it holds."""
RULES = '''"""Reward functions for `--reward-fn my_rules.py:score` (or `--eval-fn`), of TRL's GRPOTrainer form: called
once per rollout batch with the prompts, their completions and the prompt rows' other columns (one list each) as
keyword arguments, each returns one number per completion, or None where it does not apply. `score` scores the demo
task's hidden preference: the share of a completion's sentiment words that are positive. `brevity` prefers short
answers and does not apply to an empty one; give both with weights:
`--reward-fn my_rules.py:score my_rules.py:brevity --reward-weights 1.0 0.5`."""

from hybrid_engine.rlhf.demo import rule_score


def score(prompts, completions, **fields):
    return [rule_score(prompt, completion) for prompt, completion in zip(prompts, completions)]


def brevity(completions, **fields):
    return [1.0 / len(c.split()) if c.split() else None for c in completions]
'''
WHAT = {"model/": "a fresh demo model (random weights) and its tokenizer: --model {}",
        "rows.jsonl": "{n} (prompt, response) rows: hybrid-engine sft --data {}",
        "pairs.jsonl": "{n} (prompt, chosen, rejected) rows: hybrid-engine reward --data {}",
        "prompts.jsonl": "{n} (prompt) rows: hybrid-engine ppo --data {}",
        "my_rules.py": "reward functions: hybrid-engine ppo --reward-fn {0}:score {0}:brevity"}
"""What each written entry is and the flag that reads it, for the command's report."""


def add_demo_files_command(subparsers) -> None:
    p = subparsers.add_parser("demo-files", help="write example inputs of every kind (a model, data files of each "
                              "step's format, a reward function) from the built-in demo task into a folder",
                              description="Write the demo task's example inputs into --output: model/ (a fresh demo "
                              "model with its tokenizer), rows.jsonl (sft's rows), pairs.jsonl (reward's), "
                              "prompts.jsonl (ppo's) and my_rules.py (a --reward-fn function). Each data file "
                              "holds the first --rows rows of the demo's own file; --demo trains on the whole ones.")
    p.add_argument("--output", metavar="DIR", default="demo", help="the folder to write into (default: demo); "
                   "an entry already there is refused, not overwritten")
    p.add_argument("--rows", type=int, default=100, metavar="N", help="rows in each data file, at least 10 "
                   "(default: 100, enough for a run of a few steps in seconds on a CPU)")
    p.add_argument("--seed", type=int, default=0, metavar="INT", help="seeds the model's random weights (default: 0)")
    p.set_defaults(func=run_demo_files)


def run_demo_files(args: argparse.Namespace) -> int:
    """`hybrid-engine demo-files`: write_demo_files into --output, then what each entry is."""
    quiet_libraries()
    out = Path(args.output)
    write_demo_files(out, args.rows, args.seed)
    print(f"wrote {out}/:")
    for name, what in WHAT.items():
        print(f"  {name:<14} " + what.format(out / name.rstrip("/"), n=args.rows))
    return 0


def write_demo_files(out: Path, rows: int, seed: int) -> None:
    """model/, the three data files and my_rules.py into `out`; nothing is written when an entry exists already."""
    if rows < 10:
        raise ValueError(f"--rows {rows}: at least 10, so that each file keeps a held-out row")
    taken = [str(out / name) for name in WHAT if (out / name).exists()]
    if taken:
        raise ValueError(f"--output {out}: {', '.join(taken)} already there; remove it or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    for name, step in DATA_FILES.items():
        lines = (DEMO_DIR / f"{step}.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "my_rules.py").write_text(RULES, encoding="utf-8")
    demo_model(seed).save_pretrained(out / "model")
    demo_tokenizer().save_pretrained(out / "model")
