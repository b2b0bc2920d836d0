"""Step 1 of the RLHF pipeline: supervised fine-tuning on (prompt, response) rows, the loss on response
tokens only.

The model trains through a HybridEngine, so the same call runs in one process (ds_config None, plain
torch AdamW) or under DeepSpeed ZeRO 0-3 with torchrun, with or without LoRA. The loss is the token
mean of -log p over each batch's response tokens (labels from tokens.collate_sft: IGNORE_INDEX on the
prompt and the padding), computed by the fused token_logprobs op on the final hidden states, never
building [B, T, V] logits (but for a model that transforms its logits after the LM head: log_softmax of its own
logits, engine/logprobs.py scoring_head). Held-out perplexity is exp of the token-mean NLL over every response token of
the eval split (evaluated whole on every rank, so each rank reports the same figure).

    data = load_step_data(demo_config("sft"), "sft")
    result = train_sft(model, tokenizer, data, SFTConfig(epochs=1, lr=1e-3, output_dir="out/sft"))
    print(result.eval_perplexity_before, "->", result.eval_perplexity_after)
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hybrid_engine.engine import HybridEngine
from hybrid_engine.engine.logprobs import positions, scoring_head, transforms_logits
from hybrid_engine.engine.lora import base_model
from hybrid_engine.engine.packing import check_packable, packing_of
from hybrid_engine.engine.router_loss import router_aux_loss
from hybrid_engine.engine.training import adamw
from hybrid_engine.rlhf import checkpoint, fingerprints
from hybrid_engine.rlhf.accumulate import step_batches
from hybrid_engine.rlhf.data import StepData, example_row
from hybrid_engine.rlhf.distributed import rank_and_world
from hybrid_engine.rlhf.loop import Trainer, train_loop
from hybrid_engine.rlhf.step_config import StepConfig
from hybrid_engine.rlhf.tokens import IGNORE_INDEX, TokenStats, collate_sft, tokenize_sft
from hybrid_engine.rlhf.trainer import (
    check_trained,
    check_vocab,
    eval_mode,
    finite_step,
    pad_id_of,
    prepare_training,
    skipped,
    training_ds_config,
)


@dataclass
class SFTConfig(StepConfig):
    """Supervised fine-tuning (DeepSpeed-Chat's step 1): the shared StepConfig fields, plus these."""

    lr: float = 1e-3
    """Peak learning rate of AdamW (DeepSpeed-Chat's default learning_rate)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, more time)."""


@dataclass
class SFTResult:
    """What a train_sft run did."""

    losses: list[float]
    """The training loss (token-mean response NLL of the batch) of every optimizer step; NaN or inf where the
    update was skipped (config.nonfinite)."""
    eval_perplexity_before: float | None
    """Held-out perplexity before training; None when the eval split is empty."""
    eval_perplexity_after: float | None
    """Held-out perplexity after training; None when the eval split is empty."""
    evals: list[tuple[int, float]]
    """(step, held-out perplexity) of every evaluation, the first at step 0 and the last after the last step."""
    steps: int
    """Optimizer steps taken."""
    train_tokens: int
    """Tokens (prompt and response, not padding) of the training batches this rank ran."""
    train_s: float
    """Seconds in training steps (forward, backward, optimizer), without evaluation and saving."""
    wall_s: float
    """Seconds of the whole call, from building the engine to saving."""
    token_stats: TokenStats
    """What tokenizing the training rows changed (truncated and dropped prompts, cut responses)."""
    engine: HybridEngine = field(repr=False)
    """The engine that trained: its module is the trained model, ready for generation or PPO."""
    skipped: int = 0
    """Steps whose update was skipped for a NaN or inf loss (config.nonfinite "skip")."""
    stop_reason: str = ""
    """What ended the run: 'max_steps (N)' or 'epochs (...)' (loop.LoopRecord.stop_reason)."""
    lrs: list[float] = field(default_factory=list)
    """The learning rate of every optimizer step, as the schedule set it (loop.LoopRecord.lrs)."""
    router_aux_losses: list[float] = field(default_factory=list)
    """A Mixture-of-Experts model's router load-balancing loss (HF's, with output_router_logits) of every step's
    forward, observed and not added to the loss; empty for a dense model."""

    @property
    def tokens_per_s(self) -> float:
        """Training throughput of this rank."""
        return self.train_tokens / self.train_s if self.train_s else 0.0


# -- the loss -----------------------------------------------------------------------------------------------


def _forward_and_head(model) -> tuple[Callable, torch.nn.Module, bool]:
    """The forward to call, the LM head to swap and whether the model transforms its logits (scoring_head's
    hf_logits) for a HybridEngine or an HF causal LM (peft-wrapped or not)."""
    hf = base_model(model.module if isinstance(model, HybridEngine) else model)
    return model, hf.get_output_embeddings(), transforms_logits(hf.config)


def response_nll(model, batch: dict[str, torch.Tensor], packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over the response tokens, their count) of a collate_sft batch, differentiable.

    `model` is a HybridEngine or an HF causal LM. A token is scored where its label is not IGNORE_INDEX,
    predicted from the tokens before it: the label at t + 1 is the target of position t. `packed`: the rows' tokens
    run end to end in one row (engine/packing.py; a row's last target is its own padding's IGNORE_INDEX, so none
    crosses into the next row)."""
    forward, head, hf_logits = _forward_and_head(model)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    targets = torch.full_like(labels, IGNORE_INDEX)  # (B, T)
    targets[:, :-1] = labels[:, 1:]
    targets = targets.masked_fill(~mask.bool(), IGNORE_INDEX)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    if packed:
        packing = packing_of(mask)
        targets, inputs = packing.pack(targets), packing.kwargs(ids)  # (1, N)
    with scoring_head(head, targets, 1.0, hf_logits=hf_logits) as read:
        out = forward(**inputs)
    logprobs = read(out.logits)  # (B, T) or (1, N) fp32, 0 where the target is ignored
    return -logprobs.sum(), (targets != IGNORE_INDEX).sum()


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many response tokens a collate_sft batch scores (sft_loss's token mean is over them)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sft_loss(model, batch: dict[str, torch.Tensor], packed: bool = False) -> torch.Tensor:
    """The token-mean NLL of a collate_sft batch's response tokens (DeepSpeed-Chat's step-1 loss); `packed` as
    response_nll."""
    nll, count = response_nll(model, batch, packed)
    return nll / count.clamp(min=1)


@torch.no_grad()
def perplexity(model, examples: Sequence[dict], pad_id: int, batch_size: int = 32, packed: bool = False
               ) -> float | None:
    """exp of the token-mean NLL over every response token of tokenize_sft `examples` (in eval mode; the
    mode is restored after); None for no examples. `model` is a HybridEngine or an HF causal LM; `packed` as
    response_nll."""
    if not examples:
        return None
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            nll, n = response_nll(model, collate_sft(examples[start:start + batch_size], pad_id), packed)
            total, count = total + float(nll), count + int(n)
    return math.exp(total / max(count, 1))


# -- the trainer ---------------------------------------------------------------------------------------------


def _engine(model, config: SFTConfig, ds_config, lora) -> HybridEngine:
    if isinstance(model, HybridEngine):
        if ds_config is not None or lora is not None or config.gradient_checkpointing:
            raise ValueError("model is already a HybridEngine: give ds_config, lora and gradient_checkpointing "
                             "when building it, not to train_sft")
        prepare_training(model.module, config)
        return model
    ds_config = training_ds_config(ds_config, config.batch_size, config.max_grad_norm, config.lr,
                                   config.gradient_accumulation_steps)
    has_ds_optimizer = ds_config is not None and "optimizer" in ds_config
    optimizer = functools.partial(adamw, lr=config.lr, weight_decay=config.weight_decay)
    engine = HybridEngine(model, ds_config=ds_config, lora=lora, optimizer=None if has_ds_optimizer else optimizer,
                          gradient_checkpointing=config.gradient_checkpointing, seed=config.seed)
    prepare_training(engine.module, config)
    return engine


def _save(engine: HybridEngine, tokenizer, directory) -> None:
    engine.save_pretrained(directory)
    if rank_and_world()[0] == 0:
        tokenizer.save_pretrained(directory)


def train_sft(model, tokenizer, data: StepData, config: SFTConfig | None = None, ds_config=None, lora=None,
              progress: bool = True, resume: bool | str = False) -> SFTResult:
    """Fine-tune `model` (an HF causal LM, a directory, or a HybridEngine) on data.train's (prompt, response) rows,
    evaluating the held-out perplexity on data.eval before, every config.eval_every steps and after.

    ds_config: a DeepSpeed config (dict or JSON path) to train under (its micro batch and clipping come from
    `config`); None: torch AdamW (fused) in one process. lora: a peft.LoraConfig. The model trains in place (with
    LoRA, peft injects its layers into it); a HybridEngine keeps its own optimizer, whose learning rate config.lr
    and the schedule then drive (under DeepSpeed, build it with a ds_config whose gradient_accumulation_steps and
    micro batch are config's: training_ds_config). Every rank must call this under DeepSpeed; rank 0 shows the
    progress bar and writes config.output_dir. With config.checkpoint_every, checkpoints go to
    output_dir/checkpoints; resume (True: the newest there, or a folder) continues one, to the bit."""
    config = config or SFTConfig()
    t_start = time.perf_counter()
    pad_id = pad_id_of(tokenizer)  # before any work
    checkpoint.check_output(config, resume)
    torch.manual_seed(config.seed)
    engine = _engine(model, config, ds_config, lora)
    check_vocab(tokenizer, base_model(engine.module).config.vocab_size)
    if config.packing:
        check_packable(base_model(engine.module).config)
    train, stats = tokenize_sft(data.train, tokenizer, config.tokens)
    held_out, _ = tokenize_sft(data.eval, tokenizer, config.tokens)
    if not train:
        raise ValueError("no training rows left after tokenization (data.train is empty or every prompt was dropped)")
    tokens, aux_losses = 0, []

    def train_step(rows: list[int], step: int) -> float:
        nonlocal tokens
        lengths = [len(train[i]["input_ids"]) for i in rows]
        named = functools.partial(example_row, data, train, "training row")
        batches = [collate_sft([train[i] for i in part], pad_id) for part in step_batches(rows, lengths, config, named)]
        tokens += sum(int(batch["attention_mask"].sum()) for batch in batches)
        observed: list[float] = []
        losses = [functools.partial(observed_loss, batch, observed) for batch in batches]
        loss = finite_step(engine, engine.module, losses, [response_tokens(b) for b in batches], config, "sft",
                           step + 1)
        aux_losses.extend([sum(observed) / len(observed)] if observed else [])
        return loss

    def observed_loss(batch: dict, observed: list[float]) -> torch.Tensor:
        """sft_loss, with a Mixture-of-Experts model's router load-balancing loss of its forward added to `observed`."""
        with router_aux_loss(engine.module) as aux:
            loss = sft_loss(engine, batch, config.packing)
        observed.extend(aux)
        return loss

    checkpoint.check_supported(config, resume)
    run = None if not (config.checkpoint_every or resume) else {  # what a resume must match
        "data": fingerprints.rows_fingerprint(data.train, data.eval),
        "model": fingerprints.weights_fingerprint(engine.module)}
    engine.train()
    trainer = Trainer(step=train_step, evaluate=lambda: perplexity(engine, held_out, pad_id, config.eval_batch_size,
                                                                config.packing),
                      optimizers=[(engine.optimizer, config.lr)], postfix=lambda loss: {"loss": f"{loss:.3f}"},
                      show_eval=lambda ppl: {"eval_ppl": f"{ppl:.3f}"},
                      state=checkpoint.TrainedState(config, [("model", engine.module, engine.optimizer)], run=run,
                                                    zero_stage=engine.zero_stage))
    record = train_loop(len(train), config, trainer, "sft", progress, resume)
    check_trained("sft", record.steps, skipped(record.history), config.output_dir)
    if config.output_dir is not None:
        checkpoint.save_final(config.output_dir, functools.partial(_save, engine, tokenizer))
    return SFTResult(losses=record.history, eval_perplexity_before=record.evals[0][1],
                     eval_perplexity_after=record.evals[-1][1], evals=record.evals, steps=record.steps,
                     train_tokens=tokens, train_s=record.train_s, wall_s=time.perf_counter() - t_start,
                     token_stats=stats, engine=engine, skipped=skipped(record.history),
                     stop_reason=record.stop_reason, lrs=record.lrs, router_aux_losses=aux_losses)
