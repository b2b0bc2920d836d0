"""HybridEngine: one actor that trains under DeepSpeed ZeRO 0-3 (or plain torch), optionally with LoRA,
and switches into the fast generation mode and back."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import transformers

from hybrid_engine.engine import logprobs as _logprobs
from hybrid_engine.engine.hf_path import (
    FAST,
    HF,
    check_settings,
    fast_path_reason,
    hf_generation_model,
    vocab_size,
    warn_hf_path,
)
from hybrid_engine.engine.lora import base_model, wrap_lora
from hybrid_engine.engine.mode import generation_weights
from hybrid_engine.engine.save import merged_model
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.engine.stats import SwitchStats
from hybrid_engine.engine.tp import gather_prompts, local_spec, make_tp_group
from hybrid_engine.engine.training import init_distributed, load_ds_config, make_trainer
from hybrid_engine.engine.zero import gathered, on_every_rank, unique_params
from hybrid_engine.generation import GenerationOutput, SamplingParams, generate_with
from hybrid_engine.generation.checks import check_prompts
from hybrid_engine.generation.hf_generate import hf_generate
from hybrid_engine.generation.sampling import model_token_ids
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import fuse_projection_storage


def _load(model) -> torch.nn.Module:
    if isinstance(model, (str, os.PathLike)):
        return transformers.AutoModelForCausalLM.from_pretrained(model)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be an HF causal LM or a directory, got {type(model).__name__}")
    return model


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every block (transformers 5 renamed the method)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (_enable_checkpointing's, under either of transformers' names)."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, flag, False))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class HybridEngine:
    """An HF decoder-only causal LM in training mode, with a generation mode: the fast path for the families
    model/spec.py serves (Llama/Qwen2/Qwen3/OLMo 2/SmolLM3/Phi-3/Gemma 3/Mistral, OPT, GPT-2), transformers' generate
    on the gathered, LoRA-fused model for any other (engine/hf_path.py; one HFPathWarning names the family and why).

    ds_config: a DeepSpeed config (dict or JSON path), ZeRO stage 0-3; None trains in one process with
    `optimizer` (a torch optimizer, a callable(params), or None for AdamW lr 1e-5). lora: a
    peft.LoraConfig. generation: GenerationSettings (or a dict of them). seed: the generation sampler's
    seed (offset by the data-parallel rank); sampling never touches torch's global RNG, so training
    after generation continues exactly as without it.
    """

    def __init__(self, model, ds_config=None, optimizer=None, lora=None, gradient_checkpointing: bool = False,
                 generation=None, seed: int = 0):
        # Every setting is checked before any training state is built.
        self.settings = GenerationSettings.parse(generation)
        ds_config = None if ds_config is None else load_ds_config(ds_config)
        model = _load(model)
        config = base_model(model).config
        self.hf_reason = fast_path_reason(config)  # None: the fast path serves this model exactly
        self.spec = None if self.hf_reason else spec_from_config(config)
        if ds_config is not None:
            init_distributed()
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.spec is None:
            check_settings(self.settings, config, self.hf_reason)
            warn_hf_path(config, self.hf_reason)
        else:
            self.settings.check(self.spec, world_size=world)
        self._vocab = vocab_size(base_model(model)) if self.spec is None else self.spec.vocab_size
        if lora is not None:
            model = wrap_lora(model, lora)
        if gradient_checkpointing:
            _enable_checkpointing(base_model(model))
        if self.spec is not None:
            fuse_projection_storage(base_model(model), self.spec)  # q|k|v and gate|up read as views
        self._trainer = make_trainer(model, ds_config, optimizer)
        self.tp = make_tp_group(self.settings.inference_tp_size)
        group = _rank() // self.settings.inference_tp_size  # a TP group samples as one
        self._rng = torch.Generator().manual_seed(seed + group)
        self.stats = SwitchStats()
        self._net: InferenceTransformer | transformers.PreTrainedModel | None = None

    @property
    def generation_path(self) -> str:
        """Which path generates: "fast" (the inference transformer) or "hf" (transformers' generate)."""
        return FAST if self.spec is not None else HF

    # ---- training mode: DeepSpeed's verbs ----
    @property
    def module(self) -> torch.nn.Module:
        """The trained model (peft-wrapped with LoRA; ZeRO-3 partitioned under stage 3)."""
        return self._trainer.module

    @property
    def zero_stage(self) -> int | None:
        """The ZeRO stage, or None without DeepSpeed."""
        return self._trainer.zero_stage

    @property
    def optimizer(self):
        return self._trainer.optimizer

    @property
    def generator(self) -> torch.Generator:
        """The generator sampling draws from (its state belongs in a training checkpoint)."""
        return self._rng

    def __call__(self, *args, **kwargs):
        return self._trainer.forward(*args, **kwargs)

    forward = __call__

    def backward(self, loss: torch.Tensor) -> None:
        self._trainer.backward(loss)

    def step(self) -> None:
        t0 = time.perf_counter()
        self._trainer.step()
        self.stats.train_step_s = time.perf_counter() - t0

    def train(self, mode: bool = True) -> HybridEngine:
        self._trainer.train(mode)
        return self

    def eval(self) -> HybridEngine:
        return self.train(False)

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                       temperature: float = 1.0, share_prefix: bool = True, return_entropy: bool = False,
                       packed: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """fp32 [B, T - start], differentiable: the training-mode log-probs of input_ids[:, start:] (0 where
        attention_mask is 0), through the fused token_logprobs op, never building [B, T, V] logits (but for a
        model whose forward transforms its logits, Gemma 2, Granite, Cohere: log_softmax of them). Neighbouring
        rows with the same prompt (input_ids and attention_mask before column start - 1: GRPO's samples of one
        prompt) run it once, unless share_prefix is False or the model trains with gradient checkpointing. With
        return_entropy, also the policy's entropy at those positions, [B, T - start] without gradient, from the
        same forward (engine/logprobs.py). `packed`: the rows' real tokens run end to end in one row, no padding
        (engine/packing.py)."""
        model = base_model(self.module)
        agree = None
        if self.zero_stage == 3 and dist.is_initialized() and dist.get_world_size() > 1:
            # every forward gathers each layer: the ranks must run as many, whatever their own rows share
            agree = functools.partial(on_every_rank, device=input_ids.device)
        return _logprobs.token_logprobs(self._trainer.forward, model.get_output_embeddings(), input_ids,
                                        attention_mask, start, temperature, share_prefix and not _checkpointing(model),
                                        return_entropy, _logprobs.transforms_logits(model.config), packed, agree)

    # ---- generation mode ----
    @contextmanager
    def generation_mode(self) -> Iterator[HybridEngine]:
        """Holds the switch into generation mode across several generate() calls; its exit releases every
        gathered, fused, bf16 or sharded tensor and restores ZeRO-3's partitions. Reentrant."""
        if self._net is not None:
            yield self
            return
        stats = SwitchStats(train_step_s=self.stats.train_step_s)
        self.stats = stats
        if self.spec is None:
            with hf_generation_model(base_model(self.module), self.settings, stats) as plain:
                self._net = plain
                del plain
                try:
                    yield self
                finally:
                    self._net = None
            return
        spec = self.spec if self.tp is None else local_spec(self.spec, self.tp.size)
        reduce = None if self.tp is None else self.tp.all_reduce
        with generation_weights(base_model(self.module), self.spec, self.settings, self.tp, stats) as weights:
            self._net = InferenceTransformer(spec, weights, reduce, self.settings.activation_dtype)
            del weights
            try:
                yield self
            finally:
                self._net = None

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 sampling: SamplingParams | None = None, **overrides) -> GenerationOutput:
        """hybrid_engine.generate's arguments (a SamplingParams, or its fields as keyword arguments) and output, on
        the engine's current weights, its KV cache in settings.kv_dtype. The eos and pad ids the call does not give
        are the module's generation_config's, as in Hugging Face's generate. Samples from the engine's own generator
        unless a seed or a generator is given."""
        defaults = model_token_ids(base_model(self.module), self._vocab)
        params = SamplingParams.of(sampling, overrides, defaults)
        check_prompts(input_ids, attention_mask, self._vocab)  # before any collective
        params.check_vocab(self._vocab)
        input_ids = input_ids.contiguous()  # a transposed or sliced view is gathered (tensor parallel) as its values
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.contiguous()
        if params.seed is None and params.generator is None:
            params = dataclasses.replace(params, generator=self._rng)
        with self.generation_mode():
            t0 = time.perf_counter()
            if self.spec is None:
                out = hf_generate(self._net, input_ids, attention_mask, params)
            elif self.tp is None:
                out = generate_with(self._net, input_ids, attention_mask, params, kv_dtype=self.settings.kv_dtype)
            else:
                out = self._generate_tp(input_ids, attention_mask, params)
            self.stats.generate_s += time.perf_counter() - t0
            self.stats.generated_tokens += int(out.response_mask.sum())
        return out

    def _generate_tp(self, input_ids, attention_mask, params: SamplingParams) -> GenerationOutput:
        """The TP group generates every member's prompts as one batch; this rank keeps its own rows."""
        ids, mask, rows, pad = gather_prompts(self.tp, input_ids, attention_mask)
        out = generate_with(self._net, ids, mask, params, kv_dtype=self.settings.kv_dtype)
        response = out.response_mask[rows]
        n = int(response.sum(1).max())
        T = ids.shape[1]
        return GenerationOutput(sequences=out.sequences[rows, pad : T + n], logprobs=out.logprobs[rows, :n],
                                response_mask=response[:, :n])

    @torch.no_grad()
    def logprob_mismatch(self, output: GenerationOutput, prompt_mask: torch.Tensor, temperature: float = 1.0) -> dict:
        """How far `output.logprobs` (from generate) are from this engine's training-mode log-probs of the
        same sequences, in eval mode: {"mean": ..., "max": ...} absolute difference over response tokens.
        Exact (< 1e-5) with fp32 generation weights; with bf16 ones this is the error a PPO user must
        weigh (also kept in stats.logprob_mismatch)."""
        was_training = self.module.training
        self.eval()
        try:
            mask = torch.cat([prompt_mask.long(), output.response_mask], 1)
            ref = self.token_logprobs(output.sequences, mask, prompt_mask.shape[1], temperature)
        finally:
            self.train(was_training)
        keep = output.response_mask.bool()
        diff = (ref - output.logprobs)[keep].abs().double()
        result = {"mean": float(diff.mean()), "max": float(diff.max())}  # every row has >= 1 response token
        self.stats.logprob_mismatch = result
        return result

    # ---- saving ----
    def save_pretrained(self, directory: str | os.PathLike, merged: bool = True) -> None:
        """Writes the model as `from_pretrained` loads it, from any ZeRO stage (every rank must call this;
        rank 0 writes): merged=True the plain model with LoRA merged, merged=False the peft adapters."""
        model = self.module
        with gathered(unique_params([model])):
            if _rank() == 0:
                if merged:
                    merged_model(base_model(model)).save_pretrained(directory)
                elif base_model(model) is model:
                    raise ValueError("merged=False saves LoRA adapters, but the engine has no lora config")
                else:
                    model.save_pretrained(directory)
        if dist.is_initialized():
            dist.barrier()
