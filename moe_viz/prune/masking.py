"""Mask experts in a loaded model: their router logits become -inf (and correction biases -inf).

This is the reference a pruned export must reproduce exactly, and the way the
demo measures what removing experts costs, without copying any weights.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import MoeLayer, find_moe_layers
from moe_viz.models.routing import routing_tensors


class _MaskRouterLinear(TorchFunctionMode):
    """Inside a router's forward, set the dropped columns of the first F.linear by a weight shaped like the
    router's (rows, in) to -inf: the router logits, however the router calls it (a Linear child, or
    `F.linear(x, self.classifier.weight)` as LongCat-Flash does), and not a hidden layer before it (Zaya)."""

    def __init__(self, dropped: torch.Tensor, weight_shape: torch.Size):
        super().__init__()
        self.dropped = dropped
        self.weight_shape = tuple(weight_shape)
        self.done = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
        if func is F.linear and not self.done and tuple(getattr(weight, "shape", ())) == self.weight_shape:
            self.done = True
            mask = torch.zeros(out.shape[-1], dtype=torch.bool, device=out.device)
            mask[self.dropped.to(out.device)] = True
            out = out.masked_fill(mask, float("-inf"))
        return out


@contextmanager
def masked_layer(layer: MoeLayer, experts: list[int]) -> Iterator[None]:
    """While active, the given experts of one MoE layer are never routed.

    Only routed experts' rows are masked; a router's extra rows (LongCat's identity experts, Zaya's skip
    choice, Inkling's shared experts) stay as they are, as in a pruned export."""
    if not experts:
        yield
        return
    if max(experts) >= layer.num_experts or min(experts) < 0:
        raise MoeVizError(f"{layer.name} has routed experts 0..{layer.num_experts - 1}: cannot mask {max(experts)}")
    router = layer.router_parent or layer.router
    ids = torch.tensor(sorted(experts), dtype=torch.long)
    original = router.forward
    weight_shape = layer.router.weight.shape

    def forward(*args, **kwargs):
        with _MaskRouterLinear(ids, weight_shape):
            return original(*args, **kwargs)

    saved_biases = []
    router.forward = forward
    try:
        # Selection biases wherever the block keeps them (router, block, a (1, E) `moe_statics`).
        for routing in routing_tensors(layer):
            if routing.is_selection_bias:
                bias = routing.tensor
                saved_biases.append((bias, bias.detach().clone()))
                with torch.no_grad():
                    bias.index_fill_(routing.axis, ids.to(bias.device), float("-inf"))
        yield
    finally:
        if "forward" in vars(router):
            del router.forward
        with torch.no_grad():
            for bias, value in saved_biases:
                bias.copy_(value)


@contextmanager
def masked_experts(model: torch.nn.Module, dropped: dict[int, list[int]]) -> Iterator[None]:
    """While active, the experts in ``dropped`` (decoder layer -> expert ids) are never routed."""
    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    unknown = sorted(set(dropped) - set(layers))
    if unknown:
        raise MoeVizError(f"layers {unknown} are not MoE layers of this model")
    with ExitStack() as stack:
        for index, experts in dropped.items():
            stack.enter_context(masked_layer(layers[index], experts))
        yield


TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok")


@contextmanager
def reduced_top_k(model: torch.nn.Module, top_k: int | None) -> Iterator[None]:
    """While active, every MoE block routes each token to `top_k` experts instead of the model's k.

    Sets the block's and router's own top-k attributes, which is what a checkpoint whose config
    says `num_experts_per_tok = top_k` builds. A family whose block ignores them (PhiMoE's
    sparsemixer is always top-2) is refused on the first forward pass rather than evaluated wrongly.
    """
    if top_k is None:
        yield
        return
    saved, hooks = [], []

    def check(module, args):
        if args[1].shape[-1] != top_k:
            raise MoeVizError(f"{type(module).__name__} still routes {args[1].shape[-1]} experts per token with "
                              f"top_k set to {top_k}: this family's router cannot lower its top-k")

    try:
        for layer in find_moe_layers(model):
            for module in layer.block.modules():
                for name in TOP_K_ATTRIBUTES:
                    value = getattr(module, name, None)
                    if isinstance(value, int) and not isinstance(value, bool):
                        if top_k > value:
                            raise MoeVizError(f"top-k {top_k} is more than the model's {value}: it can only be lowered")
                        saved.append((module, name, value))
                        setattr(module, name, top_k)
            if layer.adapter in ("fused", "called"):
                hooks.append(layer.experts.register_forward_pre_hook(check))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, name, value in saved:
            setattr(module, name, value)


@contextmanager
def applied_plan(model: torch.nn.Module, dropped: dict[int, list[int]], top_k: int | None = None) -> Iterator[None]:
    """The reference for a plan: its dropped experts masked and, if it lowers top-k, top-k lowered."""
    with reduced_top_k(model, top_k), masked_experts(model, dropped):
        yield
