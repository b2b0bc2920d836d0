"""One RLHF run for bench_rlhf.py, in a process of its own (so that peak memory is the run's): ours or a baseline's
GRPO, RLOO or PPO on the demo task, with equal settings, writing its figures as JSON.

    python bench/rlhf_worker.py PROVIDER ALGO OUT.json [--hidden H --layers L --steps N ...]

PROVIDER: ours (hybrid_engine.rlhf.train_ppo), ours-reference (the same inside use_backend("reference"): the
engine without its kernels), trl (TRL's GRPOTrainer / RLOOTrainer, HF generate; grpo and rloo), trl-patched (the
same with apply_hybrid_engine on its model), hf (the HF baseline PPO of bench/hf_ppo.py: HF generate and eager
PyTorch; ppo only). Every side starts from the same randomly initialised Llama made from a config over the demo
tokenizer, saved and loaded back, and is rewarded by the demo's rule_score (no reward model on either side, so
both optimise the same function); PPO's critic starts on both sides from the same folder: the actor's body with a
value head drawn after torch.manual_seed(seed). fp32 (or, with --bf16, bf16 autocast for training on both
sides), temperature 1, no top-k/top-p.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers


def build_model(directory: Path, hidden: int, layers: int, seed: int) -> int:
    from hybrid_engine.rlhf.demo import demo_tokenizer

    tok = demo_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def build_critic(model_dir: Path, directory: Path, seed: int) -> None:
    """PPO's critic for both sides: the actor's body with a fresh value head, saved as a RewardModel."""
    from hybrid_engine.rlhf.reward import RewardModel

    torch.manual_seed(seed)
    RewardModel.from_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir)).save_pretrained(directory)


def prompts(n: int) -> list[str]:
    from hybrid_engine.rlhf.data import load_step_data
    from hybrid_engine.rlhf.demo import demo_config

    return list(load_step_data(demo_config("ppo"), "ppo").train["prompt"][:n])


def run_ours(model_dir: Path, args, critic_dir: Path | None) -> dict:
    import datasets

    from hybrid_engine.rlhf import PPOConfig, train_ppo
    from hybrid_engine.rlhf.data import StepData
    from hybrid_engine.rlhf.demo import demo_tokenizer, rule_score_batch

    rows = prompts(args.prompts * args.steps)
    data = StepData(train=datasets.Dataset.from_dict({"prompt": rows}),
                    eval=datasets.Dataset.from_dict({"prompt": []}), reports=[])
    config = PPOConfig(algo=args.algo, num_generations=args.generations, batch_size=args.prompts,
                       train_batch_size=args.prompts * args.generations, max_steps=args.steps,
                       max_new_tokens=args.completion, lr=args.lr, kl_coef=args.beta, schedule="constant",
                       max_grad_norm=1.0, seed=0, eval_every=0, bf16_autocast=args.bf16)
    critic = None if critic_dir is None else str(critic_dir)
    result = train_ppo(str(model_dir), demo_tokenizer(), data, config, critic=critic, reward_fn=rule_score_batch,
                       progress=False)
    steps = [{"time_s": r["generate_s"] + r["experience_s"] + r["train_s"], "generate_s": r["generate_s"],
              "experience_s": r["experience_s"], "train_s": r["train_s"], "reward": r["fn_score"], "kl": r["kl"],
              "completion_tokens": r["response_len"] * args.prompts * args.generations} for r in result.history]
    return {"steps": steps}


def run_hf(model_dir: Path, args, critic_dir: Path) -> dict:
    """The HF baseline PPO (hf_ppo.py) on the prompts train_ppo takes at each step (the same batch order)."""
    from hf_ppo import HFPPOConfig, train

    from hybrid_engine.rlhf.demo import demo_tokenizer, rule_score_batch
    from hybrid_engine.rlhf.loop import batch_order

    rows = prompts(args.prompts * args.steps)
    batches = [[rows[i] for i in b] for b in batch_order(len(rows), args.prompts, seed=0, epoch=0)[:args.steps]]
    config = HFPPOConfig(lr=args.lr, kl_coef=args.beta, num_generations=args.generations,
                         train_batch_size=args.prompts * args.generations, max_new_tokens=args.completion,
                         max_grad_norm=1.0, bf16=args.bf16, seed=0)
    return {"steps": train(model_dir, critic_dir, demo_tokenizer(), batches, rule_score_batch, config)}


def run(provider: str, model_dir: Path, args, critic_dir: Path | None) -> dict:
    if provider == "ours":
        return run_ours(model_dir, args, critic_dir)
    if provider == "ours-reference":
        from hybrid_engine import use_backend

        with use_backend("reference"):
            return run_ours(model_dir, args, critic_dir)
    if provider == "hf":
        return run_hf(model_dir, args, critic_dir)
    return run_trl(model_dir, args, provider == "trl-patched")


class StepClock(transformers.TrainerCallback):
    """Wall time of every optimizer step of a transformers Trainer."""

    def __init__(self):
        self.starts, self.times = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.starts[-1])


def run_trl(model_dir: Path, args, patched: bool) -> dict:
    import datasets
    import trl

    from hybrid_engine.rlhf.demo import demo_tokenizer, rule_score_batch

    common = dict(output_dir=str(model_dir / "trl"), use_cpu=True, report_to="none", max_steps=args.steps,
                  per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
                  max_completion_length=args.completion, learning_rate=args.lr, lr_scheduler_type="constant",
                  beta=args.beta, logging_steps=1, save_strategy="no", bf16=args.bf16, gradient_checkpointing=False,
                  seed=0, dataloader_num_workers=0, max_grad_norm=1.0, temperature=1.0, top_p=1.0)
    config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if args.algo == "grpo" else (trl.RLOOConfig,
                                                                                           trl.RLOOTrainer)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    clock = StepClock()
    trainer = trainer_cls(model=model, reward_funcs=rule_score_batch, args=config_cls(**common),
                          processing_class=demo_tokenizer(), callbacks=[clock],
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts(args.prompts * args.steps)}))
    if patched:
        from hybrid_engine import apply_hybrid_engine

        apply_hybrid_engine(trainer.model)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "reward" in log]
    lengths = [log.get("completions/mean_length", float("nan")) for log in logs]
    return {"steps": [{"time_s": t, "reward": log["reward"],
                       "completion_tokens": n * args.prompts * args.generations}
                      for t, log, n in zip(clock.times, logs, lengths)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("provider", choices=["ours", "ours-reference", "trl", "trl-patched", "hf"])
    p.add_argument("algo", choices=["grpo", "rloo", "ppo"])
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="samples per prompt")
    p.add_argument("--completion", type=int, default=32, help="max new tokens")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient, both sides (bench_rlhf: 0.1 for ppo)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training on both sides (fp32 weights)")
    args = p.parse_args()
    if args.provider == "hf" and args.algo != "ppo":
        p.error("the HF baseline (hf) is PPO only: use trl for grpo and rloo")
    if args.provider.startswith("trl") and args.algo == "ppo":
        p.error("TRL 1.16 has no PPO trainer: use hf for the ppo baseline")
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:  # alive for the whole run: TRL's RLOO reloads the model from it
        model_dir = Path(tmp) / "model"
        params = build_model(model_dir, args.hidden, args.layers, seed=0)
        critic_dir = None
        if args.algo == "ppo":
            critic_dir = Path(tmp) / "critic"
            build_critic(model_dir, critic_dir, seed=0)
        t0 = time.perf_counter()
        result = run(args.provider, model_dir, args, critic_dir)
        result.update(wall_s=time.perf_counter() - t0, params=params, threads=torch.get_num_threads(),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      settings={k: v for k, v in vars(args).items() if k != "out"})
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
