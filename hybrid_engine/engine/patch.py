"""apply_hybrid_engine: a Hugging Face causal LM's own `generate` (or a PEFT model's, or that of a DeepSpeed
engine's `.module`, ZeRO-3 partitioned or not) served by hybrid_engine's fast generation path.

Each call resolves its arguments the way transformers does (hf_args.py). What the fast path computes exactly
- greedy or sampled decoding with temperature / top-k / top-p, eos and pad ids, max_new_tokens or max_length,
sequences or a GenerateDecoderOnlyOutput - it serves: gather (ZeRO-3), fuse LoRA, generate, release, all
inside one `generation_weights` context. A family without a fast path (or a config it cannot honour exactly) runs
transformers' generate with the call's own arguments on a plain model that reads the gathered, LoRA-fused weights
(engine/hf_path.py: no ZeRO-3 hook fires per token), unless the model's dropout is active or its adapters are not
plain LoRA. Everything else runs the model's original `generate`. Either way one FallbackWarning per reason per
model names the reason.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
import torch.distributed as dist
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hybrid_engine.engine.hf_args import Fallback, Request, resolve
from hybrid_engine.engine.hf_path import hf_generation_model
from hybrid_engine.engine.lora import base_model
from hybrid_engine.engine.mode import generation_weights
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.engine.stats import SwitchStats
from hybrid_engine.engine.zero import is_partitioned
from hybrid_engine.generation import GenerationOutput, generate_with
from hybrid_engine.model.spec import ModelSpec, spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer

ARCHITECTURE = "architecture"
"""The Fallback key of a model the fast path does not serve (spec_from_config's error)."""


class FallbackWarning(UserWarning):
    """A patched generate() call ran Hugging Face's own generate; the message says why."""


class _LogitsRecorder:
    """An InferenceTransformer that keeps the raw logits [B, V] of every step (prefill, then each decode).

    While no row has finished, generate_with keeps cache slot i = batch row i, so the recorded rows are the
    batch's rows: the patch records only when no row can finish before the last (no eos, or one row)."""

    def __init__(self, net: InferenceTransformer):
        self.net, self.spec, self.steps = net, net.spec, []

    def prefill(self, *args) -> torch.Tensor:
        return self._keep(self.net.prefill(*args))

    def decode(self, *args) -> torch.Tensor:
        return self._keep(self.net.decode(*args))

    def _keep(self, logits: torch.Tensor) -> torch.Tensor:
        self.steps.append(logits.float().clone())
        return logits


def _warpers(r: Request) -> LogitsProcessorList:
    """HF's own warpers for this request, in HF's order (its scores are the processed logits)."""
    warpers, s = LogitsProcessorList(), r.sampling
    if s.do_sample:
        if s.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            warpers.append(TopKLogitsWarper(top_k=s.top_k))
        if s.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=s.top_p))
    return warpers


def hf_output(out: GenerationOutput, r: Request, logits: list[torch.Tensor] | None):
    """What HF's generate returns for `r`: the sequences, or a GenerateDecoderOnlyOutput (no KV cache)."""
    if not r.return_dict:
        return out.sequences
    scores = raw = None
    if r.output_scores:
        T, warpers = r.input_ids.shape[1], _warpers(r)
        scores = tuple(warpers(out.sequences[:, : T + i], step) for i, step in enumerate(logits))
    if r.output_logits:
        raw = tuple(logits)
    return GenerateDecoderOnlyOutput(sequences=out.sequences, scores=scores, logits=raw)


def _dropout_active(model: torch.nn.Module) -> bool:
    """True when a forward pass would sample dropout masks (training mode and some p > 0)."""
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):  # functional dropouts
            p = m.__dict__.get(name)
            if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
                return True
    return False


def _adapter_reason(model: torch.nn.Module, hf: torch.nn.Module) -> str | None:
    """Why the PEFT adapters of `model` (inside `hf`) cannot be fused into plain weights, or None."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return f"PEFT {model.active_peft_config.peft_type} prompt learning"
    for m in hf.modules():
        if isinstance(m, AuxiliaryTrainingWrapper):
            return f"PEFT {type(m).__name__} (modules_to_save / trainable tokens)"
        if isinstance(m, BaseTunerLayer) and not isinstance(m, LoraLayer):
            return f"PEFT {type(m).__name__} adapters (the fast path fuses LoRA only)"
        if isinstance(m, LoraLayer):
            if any(m.use_dora.values()) or any(getattr(m, "lora_bias", {}).values()) or getattr(m, "lora_variant", {}):
                return "a LoRA variant (DoRA, lora_bias, ...) the fast path does not fuse"
            if isinstance(m.get_base_layer(), torch.nn.Embedding):
                return "LoRA on an embedding"
    return None


def model_reason(model: torch.nn.Module, hf: torch.nn.Module) -> str | None:
    """Why the model as it stands now cannot be served exactly, or None."""
    dtypes = {p.dtype for p in hf.parameters()}
    devices = {p.device.type for p in hf.parameters()}
    if devices != {"cpu"}:
        return f"the model is on {sorted(devices)} (the fast path runs on the CPU in this release)"
    if dtypes != {torch.float32}:
        return f"the model's parameters are {sorted(map(str, dtypes))} (HF computes in them, the fast path in fp32)"
    if _dropout_active(model):
        return "the model is in training mode with dropout > 0 (model.eval() or disable_dropout serves it)"
    return _adapter_reason(model, hf)


def _agreed(plan: Request | Fallback, hf: torch.nn.Module) -> Request | Fallback:
    """ZeRO-3 ranks gather collectively, so they all take the same path: every rank falls back if one does."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return plan  # a non-CPU model falls back on every rank alike
    if not any(is_partitioned(p) for p in hf.parameters()):
        return plan
    flag = torch.tensor([int(isinstance(plan, Fallback))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not isinstance(plan, Fallback):
        return Fallback("another ZeRO-3 rank falls back (ranks generate together)")
    return plan


def _seed() -> int:
    """Drawn once from torch's global RNG (torch.manual_seed before apply reproduces runs), plus the rank."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return int(torch.randint(0, 2**62, (), dtype=torch.int64)) + rank


class HybridGenerate:
    """The `generate` that apply_hybrid_engine installs on a model.

    __wrapped__: the model's original generate (every fallback but the HF path's calls it). generator: the fast
    path's sampler, seeded once at patch time from torch's global RNG (+ the data-parallel rank); the fast path
    never touches the global RNG (HF's generate, on either fallback, samples from it). calls / fallbacks: how many
    calls took the fast path / HF's generate; stats: the SwitchStats of the last call that gathered (stats.path:
    "fast", or "hf" for the HF path on the gathered, LoRA-fused weights)."""

    def __init__(self, model: torch.nn.Module, original, settings: GenerationSettings, spec: ModelSpec | None,
                 unsupported: str | None):
        self.__wrapped__ = original
        self.__doc__ = getattr(original, "__doc__", None)
        self.model, self.settings, self.spec, self.unsupported = model, settings, spec, unsupported
        self.generator = torch.Generator().manual_seed(_seed())
        self.calls = self.fallbacks = 0
        self.stats = SwitchStats()
        self._warned: set[str] = set()

    def __call__(self, *args, **kwargs):
        hf = base_model(self.model)
        plan = _agreed(self._plan(hf, args, kwargs), hf)
        if isinstance(plan, Fallback):
            if plan.key == ARCHITECTURE and not (_dropout_active(self.model) or _adapter_reason(self.model, hf)):
                return self._serve_hf(hf, plan, args, kwargs)
            return self._fallback(plan, args, kwargs)
        return self._serve(hf, plan)

    def _plan(self, hf: torch.nn.Module, args: tuple, kwargs: dict) -> Request | Fallback:
        """The call resolved for the fast path, or why it is HF's (bad input raises ValueError)."""
        try:
            if self.unsupported is not None:
                raise Fallback(self.unsupported, ARCHITECTURE)
            reason = model_reason(self.model, hf)
            if reason is not None:
                raise Fallback(reason)
            return resolve(hf, self.spec, args, kwargs)
        except Fallback as f:
            return f

    def _warn(self, why: Fallback, what: str) -> None:
        if why.key not in self._warned:
            self._warned.add(why.key)
            warnings.warn(f"hybrid_engine runs Hugging Face's own generate{what} for this call: {why}",
                          FallbackWarning, stacklevel=4)

    def _fallback(self, why: Fallback, args: tuple, kwargs: dict):
        self._warn(why, "")
        self.fallbacks += 1
        return self.__wrapped__(*args, **kwargs)

    @torch.no_grad()
    def _serve_hf(self, hf: torch.nn.Module, why: Fallback, args: tuple, kwargs: dict):
        """HF's generate with the call's arguments, on the plain model over the gathered, LoRA-fused weights."""
        self._warn(why, " on the gathered, LoRA-fused weights")
        stats = SwitchStats()
        with hf_generation_model(hf, self.settings, stats) as plain:
            t0 = time.perf_counter()
            out = plain.generate(*args, **kwargs)
            stats.generate_s = time.perf_counter() - t0
            del plain
        self.stats = stats
        self.fallbacks += 1
        return out

    @torch.no_grad()
    def _serve(self, hf: torch.nn.Module, r: Request):
        stats = SwitchStats()
        with generation_weights(hf, self.spec, self.settings, None, stats) as weights:
            net = InferenceTransformer(self.spec, weights, activation_dtype=self.settings.activation_dtype)
            del weights
            recorder = _LogitsRecorder(net) if r.wants_logits else None
            t0 = time.perf_counter()
            out = generate_with(recorder or net, r.input_ids, r.attention_mask, r.sampling,
                                generator=self.generator if r.sampling.do_sample else None,
                                kv_dtype=self.settings.kv_dtype)
            stats.generate_s = time.perf_counter() - t0
            logits = recorder.steps if recorder is not None else None
            del net, recorder
        stats.generated_tokens = int(out.response_mask.sum())
        self.stats = stats
        self.calls += 1
        return hf_output(out, r, logits)


def _settings(generation: dict, spec: ModelSpec | None) -> GenerationSettings:
    settings = GenerationSettings.parse(generation)
    if settings.inference_tp_size != 1:
        raise ValueError(f"generation.inference_tp_size={settings.inference_tp_size!r}: apply_hybrid_engine "
                         "generates on each rank alone (use HybridEngine for tensor-parallel generation)")
    settings.check(spec, world_size=1)
    return settings


def _check_model(model) -> None:
    ds = sys.modules.get("deepspeed")
    if ds is not None and isinstance(model, ds.DeepSpeedEngine):
        raise ValueError("pass the DeepSpeed engine's .module (the HF or PEFT model) to apply_hybrid_engine")
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
        raise ValueError(f"model must be an HF causal LM (or a PEFT model of one), got {type(model).__name__}")


def apply_hybrid_engine(model: torch.nn.Module, **generation) -> torch.nn.Module:
    """Makes `model.generate` (an HF causal LM's, a PEFT model's, a DeepSpeed engine's `.module`'s, ZeRO-3
    partitioned or not) run on hybrid_engine's fast generation path, gathering and fusing LoRA around each
    call; returns the same model. `generation`: GenerationSettings (weight_dtype None or torch.bfloat16, gather "all" or
    "layer", kv_dtype torch.float32 or torch.bfloat16). Calls the fast path cannot serve exactly run the original
    generate (kept as `model.generate.__wrapped__`; `unapply_hybrid_engine` restores it) with one FallbackWarning
    per reason.
    Applying again re-patches the original with the new settings. Sampling draws from the patch's own
    generator, seeded once here from torch's global RNG: torch.manual_seed before apply reproduces runs."""
    _check_model(model)
    try:
        spec, unsupported = spec_from_config(base_model(model).config), None
    except ValueError as e:
        spec, unsupported = None, str(e)
    settings = _settings(generation, spec)
    current = model.__dict__.get("generate")
    if isinstance(current, HybridGenerate):
        if current.settings == settings:
            return model
        original = current.__wrapped__
    else:
        original = model.generate
    model.generate = HybridGenerate(model, original, settings, spec, unsupported)
    return model


def unapply_hybrid_engine(model: torch.nn.Module) -> torch.nn.Module:
    """Gives `model` back its original generate; a no-op for a model that is not patched."""
    current = model.__dict__.get("generate")
    if isinstance(current, HybridGenerate):
        original = current.__wrapped__
        if getattr(original, "__self__", None) is model and getattr(original, "__func__", None) is getattr(
                type(model), "generate", None):
            del model.generate  # the class's own method again
        else:
            model.generate = original
    return model
