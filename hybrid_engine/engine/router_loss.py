"""The router's auxiliary load-balancing loss of a Mixture-of-Experts model (Qwen3-MoE, Mixtral), observed during a
training forward: Hugging Face's own `load_balancing_loss_func` over the router logits its routers returned, as its
forward computes it with `output_router_logits=True`. It is reported, not added to any loss here."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE router modules of an HF model (its TopKRouter classes), in layer order."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def _decoder(model: torch.nn.Module, first_router: torch.nn.Module) -> torch.nn.Module:
    """The module that runs the layers (HF's `XModel`, holding `layers`) around the routers: its forward's
    attention_mask is the one HF's loss reads."""
    for m in model.modules():
        if hasattr(m, "layers") and any(r is first_router for r in m.modules()):
            return m
    return model


@contextmanager
def router_aux_loss(model: torch.nn.Module) -> Iterator[list[float]]:
    """Yields a list that, after the block, holds HF's load-balancing loss of the forwards of `model` run inside it
    (their mean, if several ran: a shared prompt's pass, then its samples'); an empty list for a model without
    routers. Each forward's own 2-D attention_mask masks its padding, as in HF's forward; a forward with another mask
    (one that spans a cached prefix) counts every row it ran."""
    routers, logits, masks, out = _routers(model), [], [], []
    if not routers:
        yield out
        return

    def keep_mask(module, args, kwargs):
        masks.append(kwargs.get("attention_mask"))

    hooks = [r.register_forward_hook(lambda mod, args, result: logits.append(result[0].detach())) for r in routers]
    hooks.append(_decoder(model, routers[0]).register_forward_pre_hook(keep_mask, with_kwargs=True))
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
    n = len(routers)
    losses = [_load_balancing_loss(routers[0], logits[i * n : (i + 1) * n], mask) for i, mask in enumerate(masks)
              if logits[i * n : (i + 1) * n]]
    if losses:
        out.append(sum(losses) / len(losses))


def _load_balancing_loss(router: torch.nn.Module, logits: list[torch.Tensor], mask: torch.Tensor | None) -> float:
    """HF's load_balancing_loss_func (from the router's own modeling module) over one forward's router logits."""
    if mask is not None and (mask.dim() != 2 or mask.numel() != logits[0].shape[0]):
        mask = None
    loss_fn = sys.modules[type(router).__module__].load_balancing_loss_func
    return float(loss_fn(tuple(logits), router.num_experts, router.top_k, mask))
