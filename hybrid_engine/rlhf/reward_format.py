"""The reward model's saved forms: what RewardModel.save_pretrained writes and what RewardModel.from_pretrained reads.

Written: a Hugging Face sequence classifier with one label, the form TRL's RewardTrainer and OpenRLHF save, so that
transformers.AutoModelForSequenceClassification loads it (LlamaForSequenceClassification, Qwen2..., Mistral...,
OPT..., GPT2ForSequenceClassification): config.json with `architectures` [XForSequenceClassification], num_labels 1
and pad_token_id, and model.safetensors with the body under the family's prefix (`model.`, GPT-2's `transformer.`)
and the head as `score.weight` [1, H]. transformers' `score` has no bias; the value head's bias (0 at init; the
pairwise loss never moves it, only rounding in AdamW does, to ~1e-3) is written as config.json's `score_bias`, so
that our reward is exactly transformers' logit + score_bias (0.0 when the bias is 0, as for any TRL model).

transformers reads the rightmost token that is not config.pad_token_id, and counts positions from column 0 (OPT from
the attention mask); we read the last token whose attention_mask is 1, with positions counted from each row's first
token. On right-padded rows whose real tokens never equal the pad id, the two read the same token with the same
positions, so the scores agree to fp32 rounding. They differ under left padding (a Llama's positions) and where
pad_token_id is also EOS (transformers then skips a trailing EOS, we read it).

Read: that form; any local folder or local Hugging Face cache name of an AutoModelForSequenceClassification with
num_labels 1 (e.g. RewardTrainer's output; no score_bias: bias 0); and the older form, the body's save_pretrained
with value_head.safetensors ('weight' [1, H] and 'bias' [1]) beside it. Refused, with the model's name: more than
one label, a classifier whose head weights are missing (transformers would draw them at random), a causal LM's or
body's folder (no head at all), a family transformers has no sequence classifier for (the saved form). Any other
decoder-only family is a reward model; the PPO step scores those through their HF forward (rlhf/scoring.py).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

HEAD_FILE = "value_head.safetensors"
"""The older form's value head, beside the body's config.json and model.safetensors."""
BIAS_KEY = "score_bias"
"""config.json's key for the value head's bias, which transformers' score layer has no place for."""
CLASSIFIER = "ForSequenceClassification"
"""How the architectures of a sequence classifier end."""


def is_reward_model_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a saved reward model: value_head.safetensors, or a config.json whose architectures
    name a sequence classifier."""
    path = Path(directory)
    if (path / HEAD_FILE).is_file():
        return True
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(CLASSIFIER) for a in architectures)


def hidden_size(config) -> int:
    """The width of the body's final hidden states (OPT's word_embed_proj_dim when it projects out)."""
    return getattr(config, "word_embed_proj_dim", None) or config.hidden_size


def check_family(config, name) -> None:
    """Refuses a model that is no decoder-only family (an encoder such as BERT, which transformers also builds as a
    masked LM, or an encoder-decoder), or whose family transformers has no sequence classifier for (a reward model
    is saved as one), naming it."""
    model_type = config.model_type
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} holds model_type {model_type!r}, which is no decoder-only causal LM: a reward "
                         "model's body is one (Llama, Qwen2, GPT-2, GPT-NeoX, ...)")
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"{name} holds model_type {config.model_type!r}, which has no sequence classifier in "
                         "transformers (AutoModelForSequenceClassification): a reward model is saved as one")


def _config(name) -> transformers.PretrainedConfig:
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ValueError(f"{name} is not a saved Hugging Face model (no config.json)")
    try:
        return transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: no such folder, and no Hugging Face model of that name in the local cache "
                         f"({first})") from None


def _head(weight: torch.Tensor, bias: float | torch.Tensor) -> torch.nn.Linear:
    """A Linear(H, 1) holding `weight` [1, H] and `bias`, built as RewardModel's head always was (the same draws of
    torch's RNG, then overwritten)."""
    head = torch.nn.Linear(weight.shape[1], 1, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(torch.as_tensor(bias, dtype=weight.dtype).reshape(1))
    return head.to(weight.device)


def classifier_parts(model: transformers.PreTrainedModel, name=None) -> tuple[transformers.PreTrainedModel,
                                                                              torch.nn.Linear]:
    """(body, head) of an XForSequenceClassification with one label: its base model (shared) and a Linear(H, 1)
    with its score weight and config's score_bias (0 when absent)."""
    name = name or type(model).__name__
    labels = model.config.num_labels
    if labels != 1:
        raise ValueError(f"{name}: a reward model has one label (num_labels=1), this classifier has {labels}")
    score = getattr(model, "score", None)
    if not isinstance(score, torch.nn.Linear):
        raise ValueError(f"{name}: a reward model's classifier head is a `score` Linear layer, "
                         f"{type(model).__name__} has none")
    return model.base_model, _head(score.weight.detach(), getattr(model.config, BIAS_KEY, None) or 0.0)


def load_parts(name: str | os.PathLike) -> tuple[transformers.PreTrainedModel, torch.nn.Linear]:
    """(body, head) of the reward model saved at `name` (a folder or a local Hugging Face cache name), in either
    form; a one-line error for anything else."""
    if (Path(name) / HEAD_FILE).is_file():
        return _load_value_head(Path(name))
    config = _config(name)
    check_family(config, name)
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith(CLASSIFIER) for a in architectures):
        raise ValueError(f"{name} holds no reward model: neither {HEAD_FILE} nor a sequence classifier (architectures "
                         f"{architectures}); train one with `hybrid-engine reward` (a plain model would score with an "
                         "untrained head)")
    if config.num_labels != 1:
        raise ValueError(f"{name}: a reward model has one label (num_labels=1), this classifier has "
                         f"{config.num_labels}")
    with torch.random.fork_rng(devices=[]):  # a missing head would be drawn from the global RNG
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(name, output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"] if k.split(".")[0] == "score")
    if missing:
        raise ValueError(f"{name}: the classifier head's weights ({', '.join(missing)}) are missing from the saved "
                         "model; transformers would draw them at random")
    return classifier_parts(model, name)


def _load_value_head(directory: Path) -> tuple[transformers.PreTrainedModel, torch.nn.Linear]:
    """The older form: the body's save_pretrained and value_head.safetensors."""
    check_family(_config(directory), directory)
    body = transformers.AutoModel.from_pretrained(directory)
    head_path = directory / HEAD_FILE
    state = load_file(head_path)
    if set(state) != {"weight", "bias"}:
        raise ValueError(f"{head_path}: expected tensors 'weight' and 'bias', got {sorted(state)}")
    return body, _head(state["weight"], state["bias"]).to(body.device)


def classifier_of(body: transformers.PreTrainedModel, head: torch.nn.Linear,
                  pad_token_id: int | None = None) -> transformers.PreTrainedModel:
    """The XForSequenceClassification that shares `body` and holds `head`'s weight as its score (a copy), with
    config.json's num_labels 1, pad_token_id (the given one, else the body's) and score_bias; save_pretrained of it
    writes the sequence-classifier form. Draws nothing from torch's RNG."""
    config = copy.deepcopy(body.config)
    config.num_labels = 1
    config.architectures = None  # save_pretrained writes the classifier's own class
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    bias = 0.0 if head.bias is None else float(head.bias.detach().float().reshape(()))
    setattr(config, BIAS_KEY, bias)
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            model = transformers.AutoModelForSequenceClassification.from_config(config)
        score = torch.nn.Linear(head.in_features, 1, bias=False, device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        score.weight.copy_(head.weight)
    setattr(model, model.base_model_prefix, body)
    model.score = score
    return model
