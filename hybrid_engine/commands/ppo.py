"""`hybrid-engine ppo`: step 3 from flags and a config file, with its logs, plot and summary.

    hybrid-engine ppo --model out/sft --reward-model out/reward --data prompts.jsonl --output out/ppo
    hybrid-engine ppo --algo grpo --num-generations 4 --reward-fn my_rules.py:score --data prompts.jsonl
    hybrid-engine ppo --model out/sft --reward-model out/reward --demo    # the built-in demo task's prompts

Each --data file is PPO's alone unless --data-split gives it a share; every column of its rows reaches each --reward-fn
and the --eval-fn as a keyword argument.

Writes to the output directory: the trained actor (save_pretrained, with its tokenizer), critic/ (PPO),
ema/ (with --ema-beta), metrics.jsonl (one record per step and per evaluation), ppo.png (the curves), summary.json,
and what --report-to's trackers write: tensorboard/ by default, wandb/ or mlruns/ (trackers.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from hybrid_engine.commands import common, run_keys, trackers, trl_names
from hybrid_engine.commands.metrics import MetricsLog, plot_curves, read_metrics
from hybrid_engine.commands.model_dirs import check_model_dir
from hybrid_engine.rlhf.checkpoint import newest_checkpoint, step_of
from hybrid_engine.rlhf.data import WHOLE_FILE, DataConfig, load_step_data
from hybrid_engine.rlhf.demo import rule_score_batch
from hybrid_engine.rlhf.distributed import is_main_rank
from hybrid_engine.rlhf.loop import evals_json
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.ppo.rewards import RewardFunctions
from hybrid_engine.rlhf.reward_fn import load_reward_fn
from hybrid_engine.rlhf.step_config import config_dict

DEFAULT_MODEL = "out/sft"
DEFAULT_REWARD_MODEL = "out/reward"


def add_ppo_command(subparsers) -> None:
    p = subparsers.add_parser("ppo", help="step 3: PPO (or --algo grpo / rloo) against a reward model and/or rule",
                              description="Train the SFT policy with PPO against the reward model (DeepSpeed-Chat's "
                              "step 3), or critic-free with --algo grpo or rloo; by default from out/sft and "
                              "out/reward, on the prompts of --data (or of the demo task with --demo).")
    common.add_training_args(p, "ppo", PPOConfig, model_help="the SFT policy to train, a saved causal LM "
                               f"(default: {DEFAULT_MODEL}, what `hybrid-engine sft` writes), or a Hugging Face name "
                               "in the local cache")
    models = p.add_argument_group("rewards and the other models")
    models.add_argument("--reward-model", *trl_names.flags("reward_model"), metavar="DIR",
                        help="the frozen reward model that scores rollouts, a folder or a Hugging Face name of a "
                        f"sequence classifier (default: {DEFAULT_REWARD_MODEL}, what `hybrid-engine reward` writes, "
                        "unless --reward-fn is given)")
    models.add_argument("--no-reward-model", action="store_true", help="score by --reward-fn alone")
    models.add_argument("--critic", metavar="DIR", help="where PPO's critic starts (default: the reward model)")
    models.add_argument("--reference", metavar="DIR", help="the frozen policy of the KL term (default: --model as "
                        "it was before training)")
    models.add_argument("--reward-fn", *trl_names.flags("reward_fn"), metavar="MODULE:FUNCTION", action="extend",
                        nargs="+", help="a rule-based reward, fn(prompts, completions, **row fields) -> one number "
                        "(or None: does not apply) each, TRL's reward function; the row fields are every other column "
                        "of the --data rows. MODULE is importable or a .py file (or give package.module.function). "
                        "Give or repeat several, weighted by --reward-weights; their weighted sum is added to the "
                        "reward model's score (times --reward-fn-weight)")
    models.add_argument("--eval-fn", metavar="MODULE:FUNCTION", action=common.Once, help="a held-out measure of the "
                        "same form, reported and plotted, never trained on (default with --demo: its rule_score); "
                        "given once")
    models.add_argument("--ptx-data", metavar="PATH", action="append", help="SFT-style (prompt, response) rows for "
                        "the pre-training loss, weighted by --ptx-coef; repeat for several files")
    common.add_lora_args(p)
    p.set_defaults(func=run_ppo)


def _model_dir(given: str | None, default: str, flag: str, step: str, reward_ok: bool = False) -> str:
    if given is None and not Path(default).is_dir():
        raise ValueError(f"{flag} not given and {default} does not exist: run `hybrid-engine {step}` first or give "
                         f"{flag} DIR")
    return str(check_model_dir(given or default, flag, reward_ok=reward_ok))


def check_reward_flags(args: argparse.Namespace, config: PPOConfig) -> tuple[list | None, object | None]:
    """The flags about rewards checked together, before any directory is looked at: (the reward functions or None,
    the eval function or None), all loaded (their files run) so that a bad one fails before any work."""
    if args.critic is not None and config.algo != "ppo":
        raise ValueError(f"--critic {args.critic}: {config.algo} has no critic (only --algo ppo trains one)")
    if args.no_reward_model and args.reward_model:
        raise ValueError(f"--reward-model {args.reward_model} and --no-reward-model exclude each other: give one")
    if args.no_reward_model and not args.reward_fn:
        raise ValueError("--no-reward-model needs --reward-fn: PPO needs a reward")
    reward_fns = reward_functions(args.reward_fn, config)
    eval_fn = load_reward_fn(args.eval_fn) if args.eval_fn else (rule_score_batch if args.demo else None)
    return reward_fns, eval_fn


def reward_functions(specs: list[str] | None, config: PPOConfig) -> list | None:
    """The --reward-fn functions loaded (their files run), checked against --reward-weights; None for none."""
    if not specs and config.reward_weights is not None:
        raise ValueError(f"--reward-weights {' '.join(map(str, config.reward_weights))}: there is no --reward-fn "
                         "to weight")
    loaded = RewardFunctions.load(specs, config.reward_weights)
    return None if loaded is None else list(loaded.fns)


def reward_model_dir(args: argparse.Namespace) -> str | None:
    """The reward model's directory: --reward-model, else out/reward unless --no-reward-model or a --reward-fn
    alone."""
    if args.no_reward_model or not (args.reward_model or not args.reward_fn):
        return None
    return _model_dir(args.reward_model, DEFAULT_REWARD_MODEL, "--reward-model", "reward", reward_ok=True)


def _ptx(args: argparse.Namespace, seed: int):
    if not args.ptx_data:
        return None
    specs = [common.parse_data(d, "--ptx-data") for d in args.ptx_data]
    for spec in specs:
        spec.data_split = WHOLE_FILE["sft"]  # all of each file is pre-training text
    data = load_step_data(DataConfig(datasets=specs, eval_fraction=0.0, seed=seed, cache_dir=args.cache_dir), "sft")
    common.print_data_lines(data, "the pre-training loss")
    return data


def run_ppo(args: argparse.Namespace) -> int:
    """`hybrid-engine ppo`: train_ppo with the flags' settings, then the logs, the plot and the summary."""
    common.quiet_libraries()
    config = common.step_config(args, PPOConfig, "ppo", run_keys.PPO)
    report = trackers.reporting(args, config.output_dir)
    reward_fn, eval_fn = check_reward_flags(args, config)
    args.model = _model_dir(args.model, DEFAULT_MODEL, "--model", "sft")
    reward_model = reward_model_dir(args)
    for flag in ("critic", "reference"):  # a folder, or a Hugging Face name's cached snapshot
        if getattr(args, flag) is not None:
            setattr(args, flag, str(check_model_dir(getattr(args, flag), f"--{flag}", reward_ok=flag == "critic")))
    ptx = [("--ptx-data", common.parse_data(d, "--ptx-data").path) for d in args.ptx_data or []]
    with common.claim(args, config.output_dir, *ptx, model=args.model, reward_model=reward_model, critic=args.critic,
                      reference=args.reference):  # one run in --output at a time
        return _run(args, config, report, reward_model, reward_fn, eval_fn)


def _run(args: argparse.Namespace, config: PPOConfig, report: trackers.Reporting, reward_model, reward_fn,
         eval_fn) -> int:
    data = common.step_data(args, "ppo", config.seed)  # every row checked before the models load
    ptx_data = _ptx(args, config.seed)
    model, tokenizer = common.model_and_tokenizer(args, config.seed, data=data)
    others = [(flag, d) for flag, d in (("--reward-model", reward_model), ("--critic", args.critic),
                                        ("--reference", args.reference)) if d is not None]
    common.preflight({"ppo": config}, {"ppo": data}, tokenizer, model, args.ds_config, others)  # before any work
    resume = resume_step(config.output_dir) if args.resume else None
    with MetricsLog(config.output_dir, "ppo", resume, report, config_dict(config)) as log:
        sources = ModelSources(actor=model, reward_model=reward_model, critic=args.critic, reference=args.reference,
                               reward_fn=reward_fn, eval_fn=eval_fn, ds_config=args.ds_config,
                               lora=common.lora_config(args))
        result = train_ppo(sources, tokenizer, data, config, ptx_data=ptx_data,
                           progress=not args.no_progress, log=log.write, resume=args.resume)
    rows, figures = ppo_summary(result)
    if is_main_rank():
        plot_curves(read_metrics(Path(config.output_dir) / "metrics.jsonl"), Path(config.output_dir) / "ppo.png",
                    f"hybrid-engine {config.algo}")
    common.report("ppo", args, config, data, rows, figures)
    return 0


def resume_step(output_dir: str) -> int:
    """The step of the checkpoint a resume continues, the newest intact one under output_dir (a clear error when
    there is none)."""
    try:
        return step_of(newest_checkpoint(output_dir))
    except ValueError as e:
        raise ValueError(f"--resume: {e} (write them with --checkpoint-every N)") from None


def _phase_totals(history: list[dict]) -> dict[str, float]:
    return {k: sum(r.get(k, 0.0) for r in history) for k in ("generate_s", "experience_s", "train_s")}


def logprob_note(history: list[dict], source: str) -> str:
    """Where the old log-probs came from, and (from the first step's check) what that saved."""
    check = next((r for r in history if "recompute_s" in r), None)
    if source != "generation" or check is None:
        return f"from {source}"
    return (f"from generation (max |difference| {check['logprob_mismatch']:.1e} to a recompute at step "
            f"{check['step']}; skipping it saved {check['recompute_s']:.2f} s per step)")


RM_OWN_TOKENIZER = "its own tokenizer's: each rollout decoded and re-encoded for it"
"""The summary's note when the reward model's tokenizer differs from the policy's."""


def generation_note(result) -> str:
    """The summary's line on which path generated the rollouts."""
    if getattr(result, "generation_path", "fast") == "fast":
        return "fast (hybrid_engine's inference transformer)"
    reason = getattr(getattr(result, "actor", None), "hf_reason", None)
    return "hf (transformers' generate on the gathered, LoRA-fused actor" + (f": {reason})" if reason else ")")


def _function_rows(before, after) -> list[tuple[str, str]]:
    """With several reward functions, each one's held-out mean before and after."""
    b, a = (getattr(e, "reward_fns", None) or {} for e in (before, after))
    return [(f"  reward function {name}", common.before_after(b.get(name), a.get(name), ".3f")) for name in a or b]


def ppo_summary(result) -> tuple[list[tuple[str, str]], dict]:
    """The summary table's rows and summary.json's figures of a PPOResult."""
    before, after = result.before, result.after

    def held_out(name: str, spec: str = ".3f") -> str:
        return common.before_after(getattr(before, name, None), getattr(after, name, None), spec)

    def measured(name: str) -> bool:  # a score the run has (no reward model: no reward-model score)
        return getattr(before, name, None) is not None or getattr(after, name, None) is not None

    scores = [("held-out reward-model score", "reward"), ("held-out rule score", "rule"),
              ("held-out reward-function score", "reward_fn")]
    totals = _phase_totals(result.history)
    rows = [("steps", f"{result.steps} ({result.skipped} updates skipped for NaN/inf)"),
            ("stopped by", result.stop_reason),
            *[(label, held_out(name)) for label, name in scores if measured(name)],
            *_function_rows(before, after),
            ("held-out KL to reference", held_out("kl") + " nats per response"),
            ("held-out response length", held_out("response_len", ".1f") + " tokens"),
            ("generation path", generation_note(result)),
            ("old log-probs", logprob_note(result.history, result.logprob_source)),
            *([("reward-model tokens", RM_OWN_TOKENIZER)] if result.rm_own_tokenizer else []),
            ("prompts truncated / dropped", f"{result.token_stats.prompts_truncated} / "
                                            f"{result.token_stats.prompts_dropped}"),
            ("time by phase", ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in totals.items())),
            ("wall time", f"{result.wall_s:.1f} s")]
    evals = evals_json(result.evals)
    figures = {"steps": result.steps, "skipped": result.skipped, "stop_reason": result.stop_reason,
               "before": evals[0][1], "after": evals[-1][1],
               "evals": evals, "history": result.history, "logprob_source": result.logprob_source,
               "generation_path": getattr(result, "generation_path", "fast"),
               "wall_s": result.wall_s, **totals, "token_stats": dataclasses.asdict(result.token_stats)}
    return rows, figures
