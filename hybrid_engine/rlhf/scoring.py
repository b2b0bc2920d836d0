"""The frozen models of the PPO step, scored through the inference path instead of an HF training forward.

The reference policy and the reward model never train, so their generation-mode weights are built once
(views of the HF parameters, no copies for fp32 weights: the fused projections are laid out in place) and every
experience batch runs through the InferenceTransformer's blocks, the kernels generation uses. The reference then
reads log-probs with the fused token_logprobs op (never building [B, T, V] logits) and the reward model reads
its value head at each sequence's last token. Both equal the HF forward within the kernels' fp32 tolerance (a test).

With an autocast dtype (PPOConfig.bf16_autocast) both score through their HF forward under autocast instead,
the precision the training forwards run in (as TRL scores its reference under bf16): on a CPU with bf16 units
that forward is ~3x faster than the fp32 inference path. A family the inference path does not serve
(spec_from_config refuses it: see engine/hf_path.py) scores through its HF forward too, in its own precision, and so
does a policy whose forward transforms its logits after the LM head (Gemma 2's or a Gemma 3's soft-cap, Granite's and
Cohere's scales: engine/logprobs.py transforms_logits), whose log-probs are log_softmax of those logits.

With `packed` (the step's packing), the HF forward runs the rows' real tokens end to end in one row
(engine/packing.py), no padding; the inference path runs its padded rows as before.

Without a partition config each rank holds a whole copy of both. With one (a training DeepSpeed config of ZeRO stage 3:
PPOConfig.partition_frozen) each is partitioned across the ranks as the actor is (engine/frozen.py): the inference
path gathers the embeddings, final norm and LM head for a scoring call and each block while it runs, the HF forward
gathers each module through DeepSpeed's hooks. The scores are the same arithmetic on the same values (a test).
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import torch

from hybrid_engine import ops
from hybrid_engine.engine import logprobs as training_logprobs
from hybrid_engine.engine.frozen import layer_by_layer, partition
from hybrid_engine.engine.lora import base_model
from hybrid_engine.engine.zero import on_every_rank
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import extract_weights, fuse_projection_storage
from hybrid_engine.ops.logprobs import IGNORE_INDEX
from hybrid_engine.rlhf.reward import RewardModel, last_token_index


def _check_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if not 1 <= start < input_ids.shape[1]:
        raise ValueError(f"start must be in [1, {input_ids.shape[1]}), got {start}")


def _autocast(dtype: torch.dtype | None, device: torch.device):
    """torch.autocast to `dtype` on `device`'s type; None: no autocast."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _spec(config):
    """The inference path's ModelSpec of `config`, or None when it does not serve that model exactly (HF forward)."""
    try:
        return spec_from_config(config)
    except ValueError:
        return None


def _beyond_window(spec, input_ids: torch.Tensor) -> bool:
    """Whether rows are longer than the model's sliding window (Gemma 3, Mistral), which the inference path does not
    apply: such rows score through the HF forward, which does."""
    return spec is not None and spec.sliding_window is not None and input_ids.shape[1] > spec.sliding_window


def _inference_net(model, spec, weight_dtype: torch.dtype | None) -> InferenceTransformer:
    """The inference path over a frozen model's weights. With fp32 weights, each block's q, k, v (and gate, up)
    are first laid end to end in one buffer (fuse_projection_storage), so that the path reads them fused as views
    of the model's own storage: no second copy of most of the model for the whole run."""
    if weight_dtype is None:
        fuse_projection_storage(model, spec)
    return InferenceTransformer(spec, extract_weights(model, spec, weight_dtype))


class _Frozen:
    """What both frozen models share: frozen parameters, their spec, and the inference path over them, whole or
    (with a partition config) partitioned and gathered layer by layer for each call."""

    def _freeze(self, model: torch.nn.Module, weight_dtype: torch.dtype | None, fast: bool,
                partition_config: dict | None) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.eval()
        self.weight_dtype = weight_dtype
        self.engine = None if partition_config is None else partition(model, partition_config)
        self.fast = fast  # whether rows within the model's window score through the inference path
        self.net = _inference_net(self.causal_lm(), self.spec, weight_dtype) if fast and self.engine is None else None

    def causal_lm(self):
        """The causal LM (or its attributes) whose weights the inference path reads."""
        return self.model

    @property
    def partitioned(self) -> bool:
        """Whether the model is partitioned across the ranks (ZeRO-3)."""
        return self.engine is not None

    def everywhere(self, flag: bool, device: torch.device) -> bool:
        """`flag` on every rank when partitioned (each rank's rows then take the same path through the same gathers),
        this rank's `flag` when whole."""
        return flag if self.engine is None else on_every_rank(flag, device)

    def hf_forward(self, input_ids: torch.Tensor) -> bool:
        """Whether rows score through the HF forward: a model the inference path does not serve, or rows (on any
        rank, when partitioned) beyond its sliding window."""
        return not self.fast or not self.everywhere(not _beyond_window(self.spec, input_ids), input_ids.device)

    def shared_cut(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cut: int) -> int:
        """`cut` where hidden_states runs the first `cut` columns once per run of rows sharing them (on every rank,
        when partitioned), else 0: the same arithmetic either way."""
        runs = InferenceTransformer.prefix_runs(input_ids, attention_mask, cut)
        return cut if self.everywhere(runs is not None, input_ids.device) else 0

    def inference(self):
        """A context yielding the inference path's net: the whole model's, or one gathering layer by layer."""
        if self.engine is None:
            return contextlib.nullcontext(self.net)
        return layer_by_layer(self.causal_lm(), self.spec, self.weight_dtype)


class FrozenPolicy(_Frozen):
    """A frozen causal LM (the PPO reference) that reads the log-probs of given tokens: through the inference
    path, or with `autocast_dtype` (or for a family the inference path does not serve, or whose logits are
    transformed after its LM head) through its HF forward, packed with `packed`."""

    def __init__(self, model: torch.nn.Module, weight_dtype: torch.dtype | None = None,
                 autocast_dtype: torch.dtype | None = None, packed: bool = False,
                 partition_config: dict | None = None):
        model = base_model(model)
        self.spec = _spec(model.config)
        self.autocast_dtype, self.packed = autocast_dtype, packed
        self.hf_logits = training_logprobs.transforms_logits(model.config)  # read from its forward's logits
        fast = not (autocast_dtype or self.spec is None or self.hf_logits)
        self._freeze(model, weight_dtype, fast, partition_config)

    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                       temperature: float = 1.0) -> torch.Tensor:
        """fp32 [B, T - start]: log p(input_ids[:, t] | input_ids[:, :t]) for t >= start, 0 where the mask is
        0; HybridEngine.token_logprobs' contract, on the frozen weights."""
        _check_rows(input_ids, attention_mask, start)
        if self.hf_forward(input_ids):
            agree = functools.partial(self.everywhere, device=input_ids.device)
            with _autocast(self.autocast_dtype, input_ids.device):
                return training_logprobs.token_logprobs(self.model, self.model.get_output_embeddings(), input_ids,
                                                        attention_mask, start, temperature, hf_logits=self.hf_logits,
                                                        packed=self.packed, agree=agree)
        B, T = input_ids.shape
        targets = torch.where(attention_mask[:, start:].bool(), input_ids[:, start:], IGNORE_INDEX)
        cut = self.shared_cut(input_ids, attention_mask, start - 1)
        with self.inference() as net:
            # (B, T - start, H); the prompt's first start - 1 columns once per run of rows sharing them
            hidden = net.hidden_states(input_ids, attention_mask, cut=cut)[:, start - 1 - cut : T - 1 - cut]
            logprobs = ops.token_logprobs(hidden.reshape(-1, hidden.shape[-1]), net.w.lm_head.weight.float(),
                                          targets.reshape(-1), temperature)
            del net
        return logprobs.view(B, T - start)


def _as_causal_lm(body: torch.nn.Module, head: torch.nn.Linear, family: str) -> SimpleNamespace:
    """The attributes model_weights reads from a causal LM, with the value head in the LM head's place."""
    if family == "gpt2":
        return SimpleNamespace(transformer=body, lm_head=head)
    return SimpleNamespace(model=body, lm_head=head)


class FrozenRewardModel(_Frozen):
    """A frozen RewardModel that scores whole sequences (prompt and response) at their last token: through the
    inference path, or with `autocast_dtype` (or for a family the inference path does not serve) through its HF
    forward, packed with `packed`."""

    def __init__(self, model: RewardModel, weight_dtype: torch.dtype | None = None,
                 autocast_dtype: torch.dtype | None = None, packed: bool = False,
                 partition_config: dict | None = None):
        if not isinstance(model, RewardModel):
            raise ValueError(f"FrozenRewardModel needs a RewardModel, got {type(model).__name__}")
        self.spec = _spec(model.config)
        self.autocast_dtype, self.packed = autocast_dtype, packed
        self._freeze(model, weight_dtype, not autocast_dtype and self.spec is not None, partition_config)

    def causal_lm(self) -> SimpleNamespace:
        return _as_causal_lm(self.model.body, self.model.value_head, self.spec.family)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 1) -> torch.Tensor:
        """fp32 [B]: each sequence's reward, the head's value at its last token with attention_mask 1
        (RewardModel.score's contract). `start`, where the responses begin (token_logprobs' argument): neighbouring
        rows that share their first start - 1 columns (a prompt and its samples) run them once."""
        _check_rows(input_ids, attention_mask, start)
        if self.hf_forward(input_ids):
            with _autocast(self.autocast_dtype, input_ids.device):
                return self.model.score(input_ids, attention_mask, self.packed)
        index = last_token_index(attention_mask)  # (B,)
        cut = start - 1 if bool((index >= start - 1).all()) else 0  # every row's last token past the shared columns
        cut = self.shared_cut(input_ids, attention_mask, cut)
        with self.inference() as net:
            hidden = net.hidden_states(input_ids, attention_mask, cut=cut)  # (B, T - cut, H)
            last = hidden[torch.arange(hidden.shape[0]), index - cut]  # (B, H)
            head = net.w.lm_head
            values = last @ head.weight.float().T  # (B, 1)
            if head.bias is not None:
                values = values + head.bias.float()
            del net, head
        return values.squeeze(-1)
