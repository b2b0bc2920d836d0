"""`hybrid-engine train`: the three steps in order, each one's output feeding the next.

    hybrid-engine train                                  # the built-in default (hybrid_engine/data/train.yaml)
    hybrid-engine train --config my.yaml --data rows.jsonl --output out/run1   # each file split 2,4,4
    hybrid-engine train --set ppo.max_steps=20 --set sft.epochs=1

The output directory gets sft/ (step 1's model), reward/ (step 2's), ppo/ (the final policy, its critic),
train.png (the PPO curves) and summary.json; each step's folder has its metrics.jsonl and, by default, tensorboard/
(--report-to: wandb/ or mlruns/ go in the output directory, one tracker run a step; trackers.py). A second run into a
folder that holds one is refused: --resume continues it, --overwrite replaces it. On the built-in demo task the
summary also checks the default run's goals: a reward model of >= 90% held-out accuracy, and a held-out rule
score raised at least halfway to its maximum with the KL to the reference below DEMO_KL_BOUND.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from hybrid_engine._build import cpu_id, cpu_model
from hybrid_engine.commands import common, run_keys, trackers
from hybrid_engine.commands.config_args import ConfigValues, build_config, file_settings, load_config_file
from hybrid_engine.commands.ds_accumulation import accumulation_from_ds_config
from hybrid_engine.commands.ds_lr import given_lrs, lr_from_ds_config
from hybrid_engine.commands.metrics import MetricsLog, log_losses, plot_curves, read_metrics
from hybrid_engine.commands.ppo import generation_note, logprob_note, ppo_summary, resume_step, reward_functions
from hybrid_engine.rlhf.checkpoint import checkpoints
from hybrid_engine.rlhf.demo import DEMO_DIR, rule_score_batch
from hybrid_engine.rlhf.distributed import is_main_rank
from hybrid_engine.rlhf.loop import as_json, evals_json
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.reward import RewardConfig, RewardEval, train_reward
from hybrid_engine.rlhf.reward_fn import load_reward_fn
from hybrid_engine.rlhf.sft import SFTConfig, train_sft
from hybrid_engine.rlhf.step_config import config_dict

DEFAULT_CONFIG = DEMO_DIR.parent / "train.yaml"
STEP_CLASSES = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}
"""Each step's config class, in the order train runs them."""
DEMO_KL_BOUND = 8.0
"""The built-in default's bound on the held-out KL to the reference, in nats per response."""
DEMO_MIN_ACCURACY = 0.9


def add_train_command(subparsers) -> None:
    p = subparsers.add_parser("train", help="the three steps in order (sft, reward, ppo); with no arguments the "
                              "built-in default on the demo task", description="Run SFT, the reward model and PPO "
                              "in order, each step's output feeding the next. With no arguments: the built-in "
                              f"default ({DEFAULT_CONFIG.name}) on the demo task, in a few minutes on a CPU.")
    p.add_argument("--config", metavar="FILE", help="a YAML or JSON file with a section per step (sft:, reward:, "
                   f"ppo:) of that step's settings; default: the built-in {DEFAULT_CONFIG}")
    p.add_argument("--set", metavar="STEP.KEY=VALUE", action="append", default=[], help="override one setting of "
                   "the config, e.g. ppo.max_steps=20 or sft.lr=1e-4 (VALUE is read as YAML); repeatable")
    p.add_argument("--model", metavar="DIR", help="the starting causal LM (default: a fresh demo model seeded by "
                   "sft's seed)")
    p.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (default: --model's, else the demo's)")
    p.add_argument("--data", metavar="PATH[:WEIGHT]", action="append", help="a data file for all three steps, "
                   "split between them by --data-split; repeatable (default without --model: the demo's three "
                   "files; with --model, --data or --demo is required)")
    p.add_argument("--demo", action="store_true", help="train on the built-in demo task's three files instead of "
                   "--data (the default when no --model is given)")
    p.add_argument("--data-split", metavar="A,B,C", help="each data file's shares for sft, reward and ppo "
                   "(default: 2,4,4)")
    p.add_argument("--eval-fraction", type=float, metavar="F", help="the held-out fraction of each step's rows")
    p.add_argument("--cache-dir", metavar="DIR", help="where `datasets` caches the converted files")
    p.add_argument("--reward-fn", metavar="MODULE:FUNCTION", action="extend", nargs="+", help="a rule-based reward "
                   "added to the reward model's score in PPO; it receives every column of the rows (as `hybrid-engine "
                   "ppo --reward-fn`); give or repeat several, weighted by the ppo step's reward_weights")
    p.add_argument("--eval-fn", metavar="MODULE:FUNCTION", action=common.Once, help="a held-out measure for PPO "
                   "(default on the demo data: its rule_score); given once")
    p.add_argument("--ds-config", metavar="FILE", help="a DeepSpeed JSON config every step trains under (run with "
                   "torchrun or deepspeed)")
    p.add_argument("--gradient-accumulation-steps", type=int, metavar="N", help="micro-batches per optimizer step "
                   "of every step (docs/rlhf.md#gradient-accumulation); a step's gradient_accumulation_steps in "
                   "--config or --set wins")
    p.add_argument("--output", metavar="DIR", default="out/train", help="where the steps write (default: out/train); "
                   "a folder that holds an earlier run is refused unless --resume or --overwrite")
    p.add_argument("--overwrite", action="store_true", help="clear --output first when it holds an earlier run, and "
                   "start a new one there")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --output: finished steps are "
                   "not run again, the step that was running resumes from its newest checkpoint (checkpoint_every "
                   "in the config)")
    trackers.add_report_args(p.add_argument_group("trackers (each step's metrics.jsonl is always written)"))
    p.set_defaults(func=run_train)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`values` with each STEP.KEY=VALUE (or KEY=VALUE) of `overrides` set, VALUE read as YAML."""
    out = json.loads(json.dumps(values))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not all(key.split(".")):
            raise ValueError(f"--set {item!r}: expected STEP.KEY=VALUE, e.g. ppo.max_steps=20")
        *sections, name = key.split(".")  # ppo.tokens.max_prompt_len: section ppo, its nested tokens
        target = out
        for i, section in enumerate(sections):
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {item!r}: {'.'.join(sections[: i + 1])!r} is not a section of the config")
        try:
            target[name] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: VALUE {text!r} is not valid YAML ({getattr(e, 'problem', e)})") from None
    return out


def check_overrides(overrides: list[str]) -> None:
    """Each --set key and its value's type checked alone, so that an unknown key is blamed on --set, not on the
    config file it is set in."""
    for item in overrides:
        source = f"--set {item}"
        values, _ = run_keys.split_run_keys(ConfigValues(apply_overrides({}, [item]), source), run_keys.TRAIN)
        for step, cls in STEP_CLASSES.items():
            file_settings(cls, values, step, source, skip=("output_dir",), also=run_keys.TRAIN)


def step_configs(args: argparse.Namespace) -> dict:
    """{step: its config dataclass} from the config file (or the built-in default) and --set; the learning rates
    neither gives from --ds-config's optimizer (ds_lr.lr_from_ds_config), and its gradient_accumulation_steps
    (ds_accumulation.py). The file's run settings (model, data,
    reward_fn, ...: run_keys.py) are set on `args` where their flags were not given, and args.ds_config, when
    neither gives one, to accelerate launch's DeepSpeed settings (common.apply_launcher_ds_config)."""
    path = args.config or DEFAULT_CONFIG
    values = ConfigValues(apply_overrides(load_config_file(path), args.set), str(path))
    check_overrides(args.set)
    values, settings = run_keys.split_run_keys(values, run_keys.TRAIN)
    given_as = "--ds-config" if args.ds_config is not None else f"ds_config of {path}"
    run_keys.apply_run_keys(args, settings)
    common.apply_launcher_ds_config(args, given_as)
    out = {}
    for step, cls in STEP_CLASSES.items():
        config = build_config(cls, None, values, section=step, skip=("output_dir",), also=run_keys.TRAIN)
        config = dataclasses.replace(config, output_dir=os.path.join(args.output, step))
        in_file = file_settings(cls, values, step, str(path), skip=("output_dir",), also=run_keys.TRAIN)
        config = _accumulation(config, in_file, args)
        out[step] = lr_from_ds_config(config, given_lrs(in_file, f"from {path}"), args.ds_config, step)
    return out


def _accumulation(config, in_file: dict, args: argparse.Namespace):
    """A step's gradient_accumulation_steps: the config file's (or --set's), else --gradient-accumulation-steps,
    else the DeepSpeed config's (ds_accumulation.py), else the default."""
    flag = args.gradient_accumulation_steps
    if flag is not None and "gradient_accumulation_steps" not in in_file:
        config = dataclasses.replace(config, gradient_accumulation_steps=flag)
        in_file = {**in_file, "gradient_accumulation_steps": flag}
    return accumulation_from_ds_config(config, in_file, args.ds_config)


def uses_demo(args: argparse.Namespace) -> bool:
    """Whether train runs on the demo task's files: --demo, or neither --data nor --model given."""
    return args.demo or not (args.data or args.model)


def _step_args(args: argparse.Namespace, **extra) -> argparse.Namespace:
    """The per-step namespace common.step_data and common.model_and_tokenizer read."""
    return argparse.Namespace(data=args.data, demo=uses_demo(args), data_split=args.data_split,
                              eval_fraction=args.eval_fraction, cache_dir=args.cache_dir, tokenizer=args.tokenizer,
                              **extra)


def train_data(args: argparse.Namespace, configs: dict) -> dict:
    """{step: its StepData}, every file of every step checked (and where its rows went printed) before any step
    runs; each --data file is split between the steps by --data-split (default 2,4,4)."""
    return {step: common.step_data(_step_args(args), step, configs[step].seed, whole_file=False)
            for step in ("sft", "reward", "ppo")}


DONE_FILE = "step_result.json"
"""Written into a step's folder when the step has finished: what the summary needs of it."""


def _finished(directory: str, resume: bool):
    """A finished step's saved result (resume only), else None."""
    path = Path(directory) / DONE_FILE
    if not (resume and path.is_file()):
        return None
    values = json.loads(path.read_text())
    for key in ("before", "after"):
        if isinstance(values.get(key), dict):
            values[key] = RewardEval(**values[key])
    return SimpleNamespace(**values)


def _mark_done(directory: str, result, fields: tuple[str, ...]) -> None:
    if not is_main_rank():
        return
    values = {}
    for name in fields:
        value = getattr(result, name)
        values[name] = evals_json(value) if name == "evals" else as_json(value)
    (Path(directory) / DONE_FILE).write_text(json.dumps(values) + "\n")


def _resume_step(config, resume: bool) -> bool:
    """Whether a step resumes: --resume and a checkpoint of it exists."""
    return resume and bool(checkpoints(config.output_dir))


SFT_FIELDS = ("eval_perplexity_before", "eval_perplexity_after", "evals", "losses", "steps", "skipped", "stop_reason",
              "wall_s")
REWARD_FIELDS = ("before", "after", "accuracy_before", "accuracy_after", "evals", "losses", "steps", "skipped",
                 "stop_reason", "wall_s")


def run_step(args, config, step: str, fields: tuple[str, ...], reporting: trackers.Reporting, train):
    """A finished step's saved result (train --resume), or `train(resume)`'s, logged (metrics.jsonl and the trackers)
    and marked done."""
    done = _finished(config.output_dir, args.resume)
    if done is not None:
        return done
    result = train(_resume_step(config, args.resume))
    log_losses(config.output_dir, step, result, reporting.for_step(step), config_dict(config))
    _mark_done(config.output_dir, result, fields)
    return result


def run_train(args: argparse.Namespace) -> int:
    """`hybrid-engine train`: sft, reward and ppo in order, then the summary table, plot and summary.json."""
    t_start = time.perf_counter()
    common.quiet_libraries()
    configs = step_configs(args)  # every setting is checked before any step starts
    reporting = trackers.reporting(args, args.output)
    with common.claim(args, args.output, model=args.model):  # one run in --output at a time
        return _run(args, configs, reporting, t_start)


def _run(args: argparse.Namespace, configs: dict, reporting: trackers.Reporting, t_start: float) -> int:
    progress = not args.no_progress
    sft_cfg, rm_cfg, ppo_cfg = configs["sft"], configs["reward"], configs["ppo"]
    demo = uses_demo(args)
    eval_fn = load_reward_fn(args.eval_fn) if args.eval_fn else (rule_score_batch if demo else None)
    reward_fn = reward_functions(args.reward_fn, ppo_cfg)  # both fail here, not after two steps
    data = train_data(args, configs)
    model, tokenizer = common.model_and_tokenizer(_step_args(args, model=args.model), sft_cfg.seed, data=data["sft"])
    common.preflight(configs, data, tokenizer, model, args.ds_config)  # every step's checks before the first step
    _banner("1/3 sft")
    sft = run_step(args, sft_cfg, "sft", SFT_FIELDS, reporting, lambda resume: train_sft(
        model, tokenizer, data["sft"], sft_cfg, ds_config=args.ds_config, progress=progress, resume=resume))
    model = sft.engine = None  # the step saved its model; the next steps load it from sft_cfg.output_dir
    _banner("2/3 reward")
    rm = run_step(args, rm_cfg, "reward", REWARD_FIELDS, reporting, lambda resume: train_reward(
        sft_cfg.output_dir, tokenizer, data["reward"], rm_cfg, ds_config=args.ds_config, progress=progress,
        resume=resume))
    rm.model = None
    _banner("3/3 ppo")
    resume = _resume_step(ppo_cfg, args.resume)
    since = resume_step(ppo_cfg.output_dir) if resume else None
    with MetricsLog(ppo_cfg.output_dir, "ppo", since, reporting.for_step("ppo"), config_dict(ppo_cfg)) as log:
        sources = ModelSources(actor=sft_cfg.output_dir, reward_model=rm_cfg.output_dir, reward_fn=reward_fn,
                               eval_fn=eval_fn, ds_config=args.ds_config)
        ppo = train_ppo(sources, tokenizer, data["ppo"], ppo_cfg, progress=progress, log=log.write, resume=resume)
    wall = time.perf_counter() - t_start
    summarize(args, configs, sft, rm, ppo, wall, demo=demo and eval_fn is rule_score_batch,
              tensorboard="tensorboard" in reporting.to)
    return 0


def _banner(text: str) -> None:
    if is_main_rank():
        print(f"\n== hybrid-engine train: step {text}", flush=True)


def demo_goals(rm, ppo) -> list[tuple[str, bool]]:
    """The built-in default's goals, each with whether the run met it."""
    acc = rm.accuracy_after or 0.0
    before, after = ppo.before, ppo.after
    halfway = before.rule + (1.0 - before.rule) / 2
    return [(f"reward model held-out accuracy {acc:.3f} >= {DEMO_MIN_ACCURACY}", acc >= DEMO_MIN_ACCURACY),
            (f"held-out rule score {after.rule:.3f} >= {halfway:.3f} (halfway from {before.rule:.3f} to 1)",
             after.rule >= halfway),
            (f"held-out KL to the reference {after.kl:.2f} < {DEMO_KL_BOUND} nats per response",
             after.kl < DEMO_KL_BOUND)]


def summary_rows(sft, rm, ppo) -> list[tuple[str, str, str, str]]:
    """(step, figure, before, after) rows of the summary table."""
    def f(x, spec=".3f"):
        return common.fmt(x, spec)

    rows = [("sft", "held-out perplexity", f(sft.eval_perplexity_before, ".2f"), f(sft.eval_perplexity_after, ".2f")),
            ("reward", "held-out accuracy", f(rm.accuracy_before), f(rm.accuracy_after)),
            ("reward", "chosen - rejected score", f(rm.before and rm.before.chosen_mean - rm.before.rejected_mean),
             f(rm.after and rm.after.chosen_mean - rm.after.rejected_mean))]
    b, a = ppo.before, ppo.after
    if b is not None:
        if b.rule is not None:
            rows.append(("ppo", "held-out rule score", f(b.rule), f(a.rule)))
        if b.reward is not None:
            rows.append(("ppo", "held-out reward-model score", f(b.reward), f(a.reward)))
        if b.reward_fn is not None:
            rows.append(("ppo", "held-out reward-function score", f(b.reward_fn), f(a.reward_fn)))
        rows += [("ppo", "KL to reference (nats/response)", f(b.kl, ".2f"), f(a.kl, ".2f")),
                 ("ppo", "response length (tokens)", f(b.response_len, ".1f"), f(a.response_len, ".1f"))]
    return rows


def _stop(result) -> str:
    """A step's stop reason (a step finished before stop reasons were recorded has none)."""
    return getattr(result, "stop_reason", None) or "n/a"


def machine() -> dict:
    """Where the run ran, for the summary."""
    return {"cpu": cpu_model(), "cpu_id": cpu_id(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def summarize(args, configs: dict, sft, rm, ppo, wall_s: float, demo: bool, tensorboard: bool = True) -> None:
    """Prints the table (and the demo's goals), writes summary.json and train.png; rank 0 only."""
    if not is_main_rank():
        return
    rows = summary_rows(sft, rm, ppo)
    widths = [max(len(r[i]) for r in rows + [("step", "figure", "before", "after")]) for i in range(4)]
    print("\nhybrid-engine train summary")
    for row in [("step", "figure", "before", "after"), *rows]:
        print("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    times = {"sft": sft.wall_s, "reward": rm.wall_s, "ppo": ppo.wall_s}
    print(f"  wall time {wall_s:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
    stops = {"sft": sft, "reward": rm, "ppo": ppo}
    print("  stopped by: " + ", ".join(f"{k} {_stop(r)}" for k, r in stops.items()))
    note = logprob_note(ppo.history, ppo.logprob_source)
    print(f"  PPO old log-probs: {note}")
    print(f"  PPO generation path: {generation_note(ppo)}")
    goals = demo_goals(rm, ppo) if demo and ppo.before is not None else []
    for text, met in goals:
        print(f"  goal {'met' if met else 'MISSED'}: {text}")
    out = Path(args.output)
    plot = plot_curves(read_metrics(out / "ppo" / "metrics.jsonl"), out / "train.png", "hybrid-engine train: PPO")
    _, ppo_figures = ppo_summary(ppo)
    header = ("step", "figure", "before", "after")
    summary = {"machine": machine(), "wall_s": wall_s, "step_wall_s": times, "ppo_logprobs": note,
               "ppo_generation_path": ppo_figures["generation_path"],
               "table": [dict(zip(header, r)) for r in rows], "goals": [{"goal": t, "met": m} for t, m in goals],
               "configs": {k: config_dict(v) for k, v in configs.items()},
               "sft": {"steps": sft.steps, "stop_reason": _stop(sft), "losses": sft.losses, "evals": sft.evals},
               "reward": {"steps": rm.steps, "stop_reason": _stop(rm), "losses": rm.losses,
                          "evals": evals_json(rm.evals)},
               "ppo": ppo_figures}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    saved = "train.png, " if plot else ""
    print(f"  saved to {out}: sft/, reward/, ppo/ (the final policy), {saved}summary.json")
    if tensorboard and shutil.which("tensorboard"):
        print(f"  tensorboard --logdir {out}/ppo/tensorboard")
