"""What the training commands (sft, reward, ppo, train) share: the flags every step takes, the step's config from
flags and a --config file, its data, the model and tokenizer, LoRA, and the summary table and summary.json.

Every field of the step's config (SFTConfig, RewardConfig, PPOConfig) is a flag and a key of the --config file
(config_args): explicit flag > config file > default. Under torchrun or the deepspeed launcher every rank runs the
command; the trainers keep the ranks in step, and only rank 0 prints and writes the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import torch
import transformers

from hybrid_engine.commands import run_keys, trackers, trl_names
from hybrid_engine.commands.accelerate_env import launch_ds_config
from hybrid_engine.commands.config_args import add_config_args, build_config, file_settings, load_config_file
from hybrid_engine.commands.ds_accumulation import accumulation_from_ds_config
from hybrid_engine.commands.ds_lr import given_lrs, lr_from_ds_config
from hybrid_engine.commands.ds_optimizer import announce_optimizer_build
from hybrid_engine.commands.model_dirs import check_model_dir, has_tokenizer, load_tokenizer
from hybrid_engine.commands.noise import silence_known_noise
from hybrid_engine.commands.outputs import OutputLock, claim_output
from hybrid_engine.rlhf.data import (
    FORMATS,
    READS,
    WHOLE_FILE,
    DataConfig,
    DatasetReport,
    DatasetSpec,
    StepData,
    check_eval_fraction,
    load_step_data,
    parse_split,
)
from hybrid_engine.rlhf.demo import demo_config, demo_model, demo_tokenizer
from hybrid_engine.rlhf.distributed import is_main_rank
from hybrid_engine.rlhf.preflight import check_step
from hybrid_engine.rlhf.step_config import config_dict

DEFAULT_OUTPUT = {"sft": "out/sft", "reward": "out/reward", "ppo": "out/ppo"}




def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """The --lora-* flags (lora_config reads them)."""
    lora = parser.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora-r", type=int, default=0, metavar="R", help="LoRA rank; 0: no LoRA, train every "
                      "weight (default: 0). The saved model has the adapters merged")
    lora.add_argument("--lora-alpha", type=float, default=16.0, metavar="ALPHA", help="LoRA scaling numerator: "
                      "the update is scaled by alpha / r (default: 16)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="dropout on the LoRA input "
                      "(default: 0)")
    lora.add_argument("--lora-target-modules", nargs="+", metavar="NAME", help="the modules LoRA adapts, by name "
                      "(e.g. q_proj v_proj; default: peft's choice for the architecture)")


def add_training_args(parser: argparse.ArgumentParser, step: str, config_cls: type,
                      model_help: str | None = None) -> None:
    """The flags every training command shares (model, tokenizer, data, output, DeepSpeed, config file, progress),
    then one flag per field of the step's config."""
    io = parser.add_argument_group("model, data and output")
    io.add_argument("--model", *trl_names.flags("model"), metavar="DIR",
                    help=model_help or "a saved Hugging Face causal LM (save_pretrained), or a Hugging Face name in "
                    "the local cache"
                    + (" or reward model" if step == "reward" else "") + "; default: a fresh demo model "
                    "(rlhf.demo.DEMO_MODEL) seeded by --seed")
    io.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (a folder or a Hugging Face name); "
                    "default: the --model directory's when it has one, else the demo tokenizer")
    io.add_argument("--data", *trl_names.flags("data"), metavar="PATH[:WEIGHT]", action="append",
                    help="a .json, .jsonl or .parquet data file, optionally with its blend weight, or a data set "
                    "as NAME[:CONFIG][@SPLIT] (a datasets name or folder); repeat for several (weights for all or "
                    "none). Required, unless --demo")
    io.add_argument("--demo", action="store_true", help=f"train on the built-in demo task's {step}.jsonl "
                    "(hybrid_engine/data/demo) instead of --data")
    io.add_argument("--data-split", metavar="A,B,C", help="each data file's shares for sft, reward and ppo, of "
                    f"which this step takes its own (default: {WHOLE_FILE[step]}, the whole file for this step)")
    io.add_argument("--eval-fraction", type=float, metavar="F", help="the fraction of this step's rows held out "
                    "for evaluation (default: 0.1)")
    io.add_argument("--cache-dir", metavar="DIR", help="where `datasets` caches the converted files (default: "
                    "its own cache)")
    io.add_argument("--output", *trl_names.flags("output"), metavar="DIR",
                    help="save the trained model, the tokenizer and summary.json here "
                    f"(default: output_dir from --config, else {DEFAULT_OUTPUT[step]}); a folder that holds an "
                    "earlier run is refused unless --resume or --overwrite, and one that another run is using is "
                    "refused")
    io.add_argument("--overwrite", action="store_true", help="clear --output first when it holds an earlier run "
                    "(its model, checkpoints and logs), and start a new run there")
    io.add_argument("--ds-config", metavar="FILE", help="a DeepSpeed JSON config to train under (ZeRO 0-3; run "
                    "with torchrun or deepspeed); its micro batch and clipping come from --batch-size and "
                    "--max-grad-norm. Default: under accelerate launch, its config's DeepSpeed settings; else "
                    "torch AdamW (fused) in one process")
    io.add_argument("--config", metavar="FILE", help=f"a YAML or JSON file of {config_cls.__name__} settings, "
                    f"flat or under a '{step}:' section; flags override it")
    io.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    io.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint under "
                    "--output (written with --checkpoint-every), with the same settings; the result is the same, to "
                    "the bit, as a run that never stopped. On another number of ranks (same ZeRO stage), give the "
                    "per-rank --batch-size that keeps the global batch: the result then follows within rounding, "
                    "not to the bit (docs/rlhf.md)")
    trackers.add_report_args(parser.add_argument_group("trackers (metrics.jsonl is always written)"))
    settings = parser.add_argument_group(f"{config_cls.__name__} settings (also keys of --config)")
    add_config_args(settings, config_cls, skip=("output_dir",))


def claim(args: argparse.Namespace, output: str, *extra: tuple[str, str | None], **inputs: str | None
          ) -> OutputLock:
    """Locks and checks the run's output folder (outputs.claim_output) for the run's --resume and --overwrite;
    none of `inputs` (by flag name, '_' for '-': reward_model="out/reward"), the `extra` (flag, path) pairs,
    --tokenizer, --data, --config and --ds-config may lie in it."""
    given = [*extra, *((f"--{k.replace('_', '-')}", v) for k, v in inputs.items())]
    given += [(flag, getattr(args, flag[2:].replace("-", "_"), None)) for flag in ("--tokenizer", "--config",
                                                                                  "--ds-config")]
    given = [(flag, path) for flag, path in given if not isinstance(path, dict)]  # accelerate launch's ds_config
    given += [("--data", parse_data(text).path) for text in getattr(args, "data", None) or []]
    return claim_output(output, resume=args.resume, overwrite=args.overwrite, inputs=given)


def quiet_libraries() -> None:
    """Turns off the progress bars transformers and datasets draw for loading, saving and converting files, so
    that a command's own bars and summary are what it prints, and the known library messages (noise.py)."""
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    silence_known_noise()


# -- from flags to the trainer's arguments --------------------------------------------------------------------


def step_config(args: argparse.Namespace, config_cls: type, step: str, run: Iterable[str] = run_keys.STEP):
    """The step's config: explicit flags over the --config file over the defaults; output_dir from --output; the
    learning rates the user did not give from --ds-config's optimizer (ds_lr.lr_from_ds_config), and its
    gradient_accumulation_steps (ds_accumulation.py). The file's run
    settings (`run`: model, data, ...; run_keys.py) are set on `args` where their flags were not given, and
    args.ds_config, when neither gives one, to accelerate launch's DeepSpeed settings (apply_launcher_ds_config)."""
    file_values = load_config_file(args.config) if args.config else {}
    file_values, settings = run_keys.split_run_keys(file_values, run)
    given_as = "--ds-config" if args.ds_config is not None else f"ds_config of {args.config}"
    run_keys.apply_run_keys(args, settings)
    apply_launcher_ds_config(args, given_as)
    config = build_config(config_cls, args, file_values, section=step, also=run)
    config = dataclasses.replace(config, output_dir=args.output or config.output_dir or DEFAULT_OUTPUT[step])
    in_file = file_settings(config_cls, file_values, step, args.config or "", also=run)
    given = given_lrs(in_file, f"from {args.config}")
    given.update({name: "from the flag" for name in given_lrs(vars(args), "")})
    config = accumulation_from_ds_config(config, [*in_file, *vars(args)], args.ds_config)
    return lr_from_ds_config(config, given, args.ds_config, step)


def apply_launcher_ds_config(args: argparse.Namespace, given_as: str) -> None:
    """args.ds_config as accelerate_env.launch_ds_config chooses it: the one given (named `given_as` in the note
    when accelerate launch gave DeepSpeed settings too), else accelerate launch's, else None; the line about it on
    the first rank (a note on stderr), and the op DeepSpeed will compile for a config file's optimizer."""
    given = args.ds_config
    args.ds_config, line = launch_ds_config(given, given_as, os.environ)
    if line and is_main_rank():
        print(line, file=sys.stderr if line.startswith("note:") else sys.stdout, flush=True)
    if given is None and isinstance(args.ds_config, str):
        announce_optimizer_build(args.ds_config)


class Once(argparse.Action):
    """A flag given at most once: a second value is refused, not put silently in place of the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        first = getattr(namespace, self.dest, None)
        if first is not None:
            raise argparse.ArgumentError(self, f"given twice ({first} and {values}); a run has one eval function: "
                                         "write one that combines the measures")
        setattr(namespace, self.dest, values)


def parse_data(text: str, flag: str = "--data") -> DatasetSpec:
    """--data PATH or PATH:WEIGHT: the weight follows the last ':' after a data file's name (a.jsonl:0.5); a ':'
    elsewhere is part of the path."""
    path, sep, weight = text.rpartition(":")
    if not sep or Path(path).suffix.lower() not in FORMATS:
        return DatasetSpec(path=text)
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"{flag} {text}: the blend weight after ':' must be a number, got {weight!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{flag} {text}: the blend weight must be a finite number >= 0, got {weight!r}")
    return DatasetSpec(path=path, weight=value)


def data_config(args: argparse.Namespace, step: str, seed: int, whole_file: bool = True) -> DataConfig:
    """The step's DataConfig from --data or --demo, --data-split, --eval-fraction and --cache-dir, checked.

    whole_file: each --data file is this step's alone unless --data-split says otherwise (sft, reward and ppo run
    by themselves); False: DataConfig's split between the three steps (train)."""
    if args.data and args.demo:
        raise ValueError("--data and --demo exclude each other: --demo trains on the built-in demo task's files")
    if not args.data and not args.demo:
        rows = f"{step} rows: {READS[step]}" if whole_file else "split between sft, reward and ppo by --data-split"
        raise ValueError(f"no data: give --data FILE ({rows}), or --demo for the built-in demo task")
    if args.data_split is not None:
        parse_split(args.data_split, "--data-split")
    if args.eval_fraction is not None:
        check_eval_fraction(args.eval_fraction, "--eval-fraction")
    given = {"eval_fraction": args.eval_fraction, "data_split": args.data_split, "cache_dir": args.cache_dir}
    given = {k: v for k, v in given.items() if v is not None}
    if args.data:
        if whole_file:
            given.setdefault("data_split", WHOLE_FILE[step])
        return DataConfig(datasets=[parse_data(d) for d in args.data], seed=seed, **given)
    config = dataclasses.replace(demo_config(step, seed=seed), **given)
    if args.data_split is not None:  # an explicit split applies to the demo file too
        config.datasets = [dataclasses.replace(s, data_split=None) for s in config.datasets]
    return config


def data_line(report: DatasetReport, step: str) -> str:
    """Where one file's rows went, in a short line: 'data a.jsonl: 1500 rows, 300 for sft (split 2,4,4): 270 train,
    30 held out'."""
    share = "all" if report.step_rows == report.rows else str(report.step_rows)
    line = (f"data {report.path}: {report.rows} rows, {share} for {step} (split {report.data_split}): "
            f"{report.train_rows} train, {report.eval_rows} held out")
    return line + (f", {report.blended_rows} in the blend" if report.blended_rows != report.train_rows else "")


def print_data_lines(data: StepData, step: str) -> None:
    if is_main_rank():
        for report in data.reports:
            print(data_line(report, step), flush=True)


def step_data(args: argparse.Namespace, step: str, seed: int, whole_file: bool = True) -> StepData:
    """The step's rows from --data (or the demo's file with --demo), --data-split and --eval-fraction (data_config);
    prints where each file's rows went."""
    data = load_step_data(data_config(args, step, seed, whole_file), step)
    print_data_lines(data, step)
    return data


def model_and_tokenizer(args: argparse.Namespace, seed: int, reward_ok: bool = False, data: StepData | None = None):
    """(--model's directory or a fresh demo model, the tokenizer --tokenizer or the model's directory holds,
    else the demo tokenizer). A loaded tokenizer is checked on a few of `data`'s texts (model_dirs.round_trip)."""
    model = str(check_model_dir(args.model, reward_ok=reward_ok)) if args.model else demo_model(seed)
    sample = sample_texts(data) if data is not None else ()
    if args.tokenizer:
        return model, load_tokenizer(args.tokenizer, sample=sample)
    if args.model and has_tokenizer(model):  # the model's folder (a Hub name's cached snapshot)
        return model, load_tokenizer(model, flag="--model", sample=sample)
    if args.model and is_main_rank():
        print(f"note: {args.model} has no tokenizer; using the demo tokenizer (give --tokenizer DIR otherwise)",
              file=sys.stderr)
    return model, demo_tokenizer()


def model_config(model, flag: str = "--model"):
    """The Hugging Face config of a model given as a saved directory or as a built model."""
    if isinstance(model, torch.nn.Module):
        return model.config
    return transformers.AutoConfig.from_pretrained(str(check_model_dir(model, flag, reward_ok=True)))


def preflight(steps: dict, data: dict, tokenizer, model, ds_config=None, others: Sequence[tuple[str, str]] = ()):
    """rlhf.preflight's checks for each step of {step: config} on {step: StepData}, before any work: the model (a
    directory or a built model) and the others ((flag, directory) of further models the rows go through)."""
    models = [("the model" if isinstance(model, torch.nn.Module) else f"--model {model}", model_config(model))]
    models += [(f"{flag} {directory}", model_config(directory, flag)) for flag, directory in others]
    for step, config in steps.items():
        check_step(step, config, data[step], tokenizer, models, ds_config)


def sample_texts(data: StepData, rows: int = 8) -> list[str]:
    """The text columns of the first `rows` training rows (prompt, response, chosen, rejected)."""
    head = data.train.select(range(min(rows, len(data.train))))
    return [text for name in head.column_names if name in ("prompt", "response", "chosen", "rejected")
            for text in head[name]]


def lora_config(args: argparse.Namespace):
    """The peft.LoraConfig of the --lora-* flags; None for --lora-r 0."""
    if args.lora_r < 0:
        raise ValueError(f"--lora-r must be 0 (no LoRA) or a positive rank, got {args.lora_r}")
    if args.lora_r == 0:
        return None
    import peft  # here, with LoRA asked for: importing peft costs every command about 0.7 s of start-up

    return peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           target_modules=args.lora_target_modules)


# -- the summary --------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def before_after(before, after, spec: str = ".4f") -> str:
    return f"{fmt(before, spec)} -> {fmt(after, spec)}"


def report(step: str, args: argparse.Namespace, config, data: StepData, rows: list[tuple[str, str]],
           figures: dict) -> None:
    """Prints the summary table and writes config.output_dir/summary.json, on the main rank only."""
    if not is_main_rank():
        return
    width = max(len(label) for label, _ in rows)
    print(f"\n{step} summary")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    summary = {"command": step, "model": args.model or "demo model (random init)",
               "data": [dataclasses.asdict(r) for r in data.reports], "train_rows": len(data.train),
               "eval_rows": len(data.eval), "config": config_dict(config), **figures}
    path = Path(config.output_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  {'saved to':<{width}}  {config.output_dir} (summary.json beside the model)")







