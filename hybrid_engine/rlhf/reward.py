"""Step 2 of the RLHF pipeline: a reward model trained on (prompt, chosen, rejected) pairs.

The reward model is a causal LM's body (its `base_model`: LlamaModel, Qwen2Model, GPT2Model, GPTNeoXModel, ...:
any decoder-only family transformers has a sequence classifier for) with a scalar value head, nn.Linear(H, 1), on
its final hidden states. A sequence's reward is the head's value at its last non-pad token (the last position where
attention_mask is 1, so right padding, left padding and a left-padded prompt followed by a response that ended early
all read the right token); the pairwise loss is -log sigmoid(r_chosen - r_rejected), its batch mean.

It is saved as a Hugging Face sequence classifier with one label (XForSequenceClassification, the head as
`score`), which transformers.AutoModelForSequenceClassification, TRL and OpenRLHF load; RewardModel.from_pretrained
reads that, any such classifier (TRL's RewardTrainer's output), and the older body + value_head.safetensors folders
(reward_format.py says what is written, what is read and where transformers' scores could differ from ours);
nothing is pickled. Later steps use it as
    - the frozen reward model that scores PPO rollouts: `score(input_ids, attention_mask) -> [B]`;
    - the critic's initialisation: `values(input_ids, attention_mask) -> [B, T]`, differentiable.

train_reward trains it with torch AdamW (fused) in one process, or under DeepSpeed ZeRO 0-3 when given a
ds_config (every rank calls it; rank 0 writes). LoRA is not offered for the reward model.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from hybrid_engine.engine.logprobs import positions
from hybrid_engine.engine.lora import lora_layers
from hybrid_engine.engine.packing import Packing, check_packable, packing_of
from hybrid_engine.engine.training import adamw, make_trainer
from hybrid_engine.engine.zero import gathered, unique_params
from hybrid_engine.rlhf import checkpoint, fingerprints
from hybrid_engine.rlhf.accumulate import step_batches
from hybrid_engine.rlhf.data import StepData, example_row
from hybrid_engine.rlhf.distributed import rank_and_world
from hybrid_engine.rlhf.loop import Trainer, train_loop
from hybrid_engine.rlhf.reward_format import (
    CLASSIFIER,
    check_family,
    classifier_of,
    classifier_parts,
    hidden_size,
    is_reward_model_dir,
    load_parts,
)
from hybrid_engine.rlhf.step_config import StepConfig
from hybrid_engine.rlhf.tokens import TokenStats, collate_reward, tokenize_reward
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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the index of each row's last token with attention_mask 1 (T - 1 under left padding)."""
    mask = attention_mask.bool()  # (B, T)
    if not mask.any(1).all():
        raise ValueError("attention_mask has a row with no tokens: a reward needs at least one")
    return mask.shape[1] - 1 - mask.flip(1).long().argmax(1)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The mean over pairs of -log sigmoid(chosen - rejected) (InstructGPT's reward loss); chosen, rejected [B]."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both be [B], got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    return -F.logsigmoid(chosen - rejected).mean()


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is None or attention_mask.shape != input_ids.shape:
        got = None if attention_mask is None else tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {got}")


def _check_body(body) -> None:
    if not isinstance(body, transformers.PreTrainedModel):
        raise ValueError(f"a reward model needs a Hugging Face model, got {type(body).__name__}")
    check_family(body.config, type(body).__name__)
    if body.base_model is not body:
        raise ValueError(f"a reward model's body is a base model, got the causal LM {type(body).__name__}: pass its "
                         "body (model.base_model), or use RewardModel.from_model(model)")


class RewardModel(torch.nn.Module):
    """A causal LM's body with a scalar value head read at the last non-pad token."""

    def __init__(self, body: transformers.PreTrainedModel, value_head: torch.nn.Linear | None = None):
        super().__init__()
        _check_body(body)
        H = hidden_size(body.config)
        if value_head is None:  # lm-human-preferences' reward head init: N(0, 1 / (H + 1)), bias 0
            value_head = torch.nn.Linear(H, 1, dtype=body.dtype, device=body.device)
            torch.nn.init.normal_(value_head.weight, std=1 / math.sqrt(H + 1))
            torch.nn.init.zeros_(value_head.bias)
        if value_head.in_features != H or value_head.out_features != 1:
            raise ValueError(f"value_head must be Linear({H}, 1), got Linear({value_head.in_features}, "
                             f"{value_head.out_features})")
        self.body = body
        self.value_head = value_head

    @property
    def config(self) -> transformers.PretrainedConfig:
        """The body's config."""
        return self.body.config

    # ---- building and saving ----
    @classmethod
    def from_model(cls, model: torch.nn.Module) -> RewardModel:
        """A reward model on `model`'s body (an HF causal LM's base_model, or a body itself), sharing its
        parameters, with a new value head drawn from torch's global RNG."""
        if type(model).__module__.startswith("peft"):
            raise ValueError("a peft model cannot be a reward model's body: merge its adapters first "
                             "(merge_and_unload) or give the plain model")
        if not isinstance(model, transformers.PreTrainedModel):
            raise ValueError(f"a reward model needs a Hugging Face model, got {type(model).__name__}")
        if lora_layers(model):
            raise ValueError("the model holds LoRA layers (peft injected them): give the merged model, e.g. the "
                             "directory train_sft saved")
        return cls(model.base_model)

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike) -> RewardModel:
        """The reward model saved at `name`, a folder or a local Hugging Face cache name: a sequence classifier with
        one label (save_pretrained's form, TRL's RewardTrainer's) or an older body + value_head.safetensors folder."""
        return cls(*load_parts(name))

    @classmethod
    def from_classifier(cls, model: transformers.PreTrainedModel) -> RewardModel:
        """A reward model on an XForSequenceClassification with one label: its body (shared) and its score (copied,
        with config.score_bias as the bias)."""
        return cls(*classifier_parts(model))

    @classmethod
    def load(cls, model_or_path) -> RewardModel:
        """A RewardModel itself; a reward model's directory (either saved form); a causal LM's (or body's) directory
        with a new head; a sequence classifier with one label (its body shared, its score copied); or an HF model (its
        body, shared, with a new head)."""
        if isinstance(model_or_path, RewardModel):
            return model_or_path
        if type(model_or_path).__name__.endswith(CLASSIFIER):
            return cls.from_classifier(model_or_path)
        if isinstance(model_or_path, (str, os.PathLike)):
            directory = Path(model_or_path)
            if is_reward_model_dir(directory):
                return cls.from_pretrained(directory)
            _check_body_config(directory)
            return cls(transformers.AutoModel.from_pretrained(directory))
        return cls.from_model(model_or_path)

    def save_pretrained(self, directory: str | os.PathLike, pad_token_id: int | None = None) -> None:
        """The model as an XForSequenceClassification with one label (reward_format.py), config.pad_token_id
        `pad_token_id` (None: the body's), from any ZeRO stage (every rank must call this under DeepSpeed; rank 0
        writes)."""
        rank, _ = rank_and_world()
        with gathered(unique_params([self])):
            if rank == 0:
                os.makedirs(directory, exist_ok=True)
                classifier_of(self.body, self.value_head, pad_token_id).save_pretrained(directory)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    # ---- reading rewards ----
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The body's final hidden states (B, T, H), with position ids counted from each row's first token."""
        _check_inputs(input_ids, attention_mask)
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                        use_cache=False)
        return out.last_hidden_state

    def packed_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                             ) -> tuple[torch.Tensor, Packing]:
        """The body's final hidden states (1, N, H) of the rows' real tokens run end to end in one row
        (engine/packing.py), and where each row lies in it."""
        _check_inputs(input_ids, attention_mask)
        packing = packing_of(attention_mask)
        return self.body(**packing.kwargs(input_ids)).last_hidden_state, packing

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """fp32 [B, T]: the head's value at every position (0 where attention_mask is 0), differentiable: the
        critic's per-token values. `packed`: one forward over the packed row (packed_hidden_states)."""
        if packed:
            hidden, packing = self.packed_hidden_states(input_ids, attention_mask)
            return packing.unpack(self.value_head(hidden).squeeze(-1).float())
        values = self.value_head(self.hidden_states(input_ids, attention_mask)).squeeze(-1).float()
        return torch.where(attention_mask.bool(), values, torch.zeros_like(values))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """fp32 [B]: each sequence's reward, the head's value at its last non-pad token; differentiable. `packed`:
        one forward over the packed row (packed_hidden_states), read at each row's last token there."""
        if packed:
            last_token_index(attention_mask)  # refuses a row with no tokens
            hidden, packing = self.packed_hidden_states(input_ids, attention_mask)  # (1, N, H)
            return self.value_head(hidden[0, packing.last]).squeeze(-1).float()
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.value_head(last).squeeze(-1).float()

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """fp32 [B]: forward without gradients, for scoring rollouts (call .eval() first for a frozen model)."""
        return self.forward(input_ids, attention_mask, packed)


def _check_body_config(directory: Path) -> None:
    """Refuses a directory that is not a saved HF model of a supported family, before loading any weights."""
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} is not a saved Hugging Face model (no config.json)")
    check_family(transformers.AutoConfig.from_pretrained(directory), directory)


# -- training -------------------------------------------------------------------------------------------------


@dataclass
class RewardConfig(StepConfig):
    """Reward-model training (DeepSpeed-Chat's step 2): the shared StepConfig fields."""

    lr: float = 5e-5
    """Peak learning rate of AdamW (DeepSpeed-Chat's step-2 default learning_rate)."""


@dataclass
class RewardEval:
    """A reward model on held-out pairs."""

    accuracy: float
    """The fraction of pairs with r_chosen > r_rejected (a tie counts as wrong)."""
    chosen_mean: float
    """The mean reward of the chosen responses."""
    rejected_mean: float
    """The mean reward of the rejected responses."""
    loss: float
    """The mean pairwise loss."""


@dataclass
class RewardResult:
    """What a train_reward run did."""

    losses: list[float]
    """The training loss (mean pairwise loss of the batch) of every optimizer step; NaN or inf where the update was
    skipped (config.nonfinite)."""
    before: RewardEval | None
    """Held-out figures before training; None when the eval split is empty."""
    after: RewardEval | None
    """Held-out figures after training; None when the eval split is empty."""
    evals: list[tuple[int, RewardEval | None]]
    """(step, held-out figures) of every evaluation, the first at step 0 and the last after the last step."""
    steps: int
    """Optimizer steps taken."""
    train_s: float
    """Seconds in training steps (forward, backward, optimizer), without evaluation and saving."""
    wall_s: float
    """Seconds of the whole call, from loading the model to saving."""
    token_stats: TokenStats
    """What tokenizing the training pairs changed."""
    model: RewardModel = field(repr=False)
    """The trained reward model."""
    skipped: int = 0
    """Steps whose update was skipped for a NaN or inf loss (config.nonfinite "skip")."""
    stop_reason: str = ""
    """What ended the run: 'max_steps (N)' or 'epochs (...)' (loop.LoopRecord.stop_reason)."""
    lrs: list[float] = field(default_factory=list)
    """The learning rate of every optimizer step, as the schedule set it (loop.LoopRecord.lrs)."""

    @property
    def accuracy_before(self) -> float | None:
        return None if self.before is None else self.before.accuracy

    @property
    def accuracy_after(self) -> float | None:
        return None if self.after is None else self.after.accuracy


def reward_batch(forward, batch: dict[str, torch.Tensor], packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) of a collate_reward batch, both halves in one forward pass of `forward`
    (a RewardModel, or the DeepSpeed engine around one); `packed` as RewardModel.forward."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    rewards = forward(ids, mask, packed=packed) if packed else forward(ids, mask)
    return rewards.chunk(2)


def batch_loss(forward, batch: dict[str, torch.Tensor], packed: bool = False) -> torch.Tensor:
    """The mean pairwise loss of a collate_reward batch, differentiable; `packed` as RewardModel.forward."""
    return pairwise_loss(*reward_batch(forward, batch, packed))


@torch.no_grad()
def evaluate_reward(forward, examples: Sequence[dict], pad_id: int, batch_size: int = 32, packed: bool = False
                    ) -> RewardEval | None:
    """Accuracy, mean rewards and loss on tokenize_reward `examples`; None for no examples. `forward` is a
    RewardModel (or the DeepSpeed engine around one) in the mode the caller chose; `packed` as RewardModel.forward."""
    if not examples:
        return None
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        c, r = reward_batch(forward, collate_reward(examples[start:start + batch_size], pad_id), packed)
        chosen.append(c)
        rejected.append(r)
    c, r = torch.cat(chosen).double(), torch.cat(rejected).double()
    return RewardEval(accuracy=float((c > r).double().mean()), chosen_mean=float(c.mean()),
                      rejected_mean=float(r.mean()), loss=float(pairwise_loss(c, r)))


def _save(model: RewardModel, tokenizer, directory) -> None:
    model.save_pretrained(directory, pad_token_id=tokenizer.pad_token_id)
    if rank_and_world()[0] == 0:
        tokenizer.save_pretrained(directory)


def train_reward(model_or_path, tokenizer, data: StepData, config: RewardConfig | None = None, ds_config=None,
                 progress: bool = True, resume: bool | str = False) -> RewardResult:
    """Train a reward model on data.train's (prompt, chosen, rejected) pairs, evaluating on data.eval before,
    every config.eval_every steps and after; the model comes back in eval mode.

    model_or_path: a RewardModel, an HF causal LM or body (its body is shared and trained in place), a
    directory of a saved causal LM (e.g. the SFT output) or of a saved reward model. ds_config: a DeepSpeed
    config (dict or JSON path; its micro batch and clipping come from `config`); None: torch AdamW (fused) in
    one process. Every rank must call this under DeepSpeed; rank 0 shows the progress bar and writes
    config.output_dir. checkpoint_every and resume as train_sft."""
    config = config or RewardConfig()
    t_start = time.perf_counter()
    pad_id = pad_id_of(tokenizer)  # before any work
    checkpoint.check_output(config, resume)
    ds_config = training_ds_config(ds_config, config.batch_size, config.max_grad_norm, config.lr,
                                   config.gradient_accumulation_steps)
    torch.manual_seed(config.seed)
    model = prepare_training(RewardModel.load(model_or_path), config)
    check_vocab(tokenizer, model.config.vocab_size)
    if config.packing:
        check_packable(model.config)
    train, stats = tokenize_reward(data.train, tokenizer, config.tokens)
    held_out, _ = tokenize_reward(data.eval, tokenizer, config.tokens)
    if not train:
        raise ValueError("no training pairs left after tokenization (data.train is empty or every prompt was dropped)")

    optimizer = functools.partial(adamw, lr=config.lr, weight_decay=config.weight_decay)
    trainer = make_trainer(model, ds_config, None if ds_config is not None and "optimizer" in ds_config else optimizer)

    def train_step(rows: list[int], step: int) -> float:
        lengths = [len(train[i]["chosen_input_ids"]) + len(train[i]["rejected_input_ids"]) for i in rows]
        batches = [collate_reward([train[i] for i in part], pad_id)
                   for part in step_batches(rows, lengths, config,
                                            functools.partial(example_row, data, train, "training pair"))]
        losses = [functools.partial(batch_loss, trainer.forward, batch, config.packing) for batch in batches]
        pairs = [len(batch["chosen_input_ids"]) for batch in batches]
        return finite_step(trainer, model, losses, pairs, config, "reward", step + 1)

    def evaluate() -> RewardEval | None:
        with eval_mode(trainer):
            return evaluate_reward(trainer.forward, held_out, pad_id, config.eval_batch_size, config.packing)

    checkpoint.check_supported(config, resume)
    run = None if not (config.checkpoint_every or resume) else {  # what a resume must match
        "data": fingerprints.rows_fingerprint(data.train, data.eval), "model": fingerprints.weights_fingerprint(model)}
    trainer.train(True)
    hooks = Trainer(step=train_step, evaluate=evaluate, optimizers=[(trainer.optimizer, config.lr)],
                    postfix=lambda loss: {"loss": f"{loss:.3f}"}, show_eval=lambda e: {"eval_acc": f"{e.accuracy:.3f}"},
                    state=checkpoint.TrainedState(config, [("reward_model", model, trainer.optimizer)], RewardEval,
                                                  run=run, zero_stage=trainer.zero_stage))
    record = train_loop(len(train), config, hooks, "reward", progress, resume)
    trainer.train(False)
    check_trained("reward", record.steps, skipped(record.history), config.output_dir)
    if config.output_dir is not None:
        checkpoint.save_final(config.output_dir, functools.partial(_save, model, tokenizer))
    return RewardResult(losses=record.history, before=record.evals[0][1], after=record.evals[-1][1],
                        evals=record.evals, steps=record.steps, train_s=record.train_s,
                        wall_s=time.perf_counter() - t_start, token_stats=stats, model=model,
                        skipped=skipped(record.history), stop_reason=record.stop_reason, lrs=record.lrs)
