"""Routing tensors: a MoE block's parameters and buffers, outside its experts, with one entry per expert.

Router rows and biases, wherever a family keeps them (router, block, `moe_statics`). Pruning slices
them on their expert axis; the masking reference sets the dropped experts' entries to -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import MoeLayer

# Per-expert routing tensors outside the router's weight that steer *selection* only (added to scores
# before top-k); masking an expert sets its entry to -inf. Names as transformers 5 spells them.
SELECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "balancing_biases")


@dataclass
class RoutingTensor:
    """A parameter or buffer of a MoE block, outside its experts, with one entry per routed expert."""

    path: str  # relative to the block, e.g. "gate.weight", "e_score_correction_bias"
    module: nn.Module
    attribute: str
    axis: int  # the expert axis
    size: int  # its length: E, or the router's rows (E + extra choices)

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attribute)

    @property
    def is_selection_bias(self) -> bool:
        return self.attribute in SELECTION_BIAS_NAMES


def expert_axis(shape: tuple[int, ...], num_experts: int) -> int | None:
    """The expert axis of a routing tensor: dim 0 of (E, ...) and the last dim of (1, ..., 1, E)."""
    if shape and shape[0] == num_experts:
        return 0
    if shape and shape[-1] == num_experts and all(d == 1 for d in shape[:-1]):
        return len(shape) - 1
    return None


def routing_tensors(layer: MoeLayer) -> list[RoutingTensor]:
    """Every parameter and buffer with an expert dimension on the block itself or in its router
    (container): router rows and biases wherever they sit (on the router, on the block, in a
    `moe_statics` child shaped (1, E), Gemma-4's `router.per_expert_scale`). Other children of the
    block (experts, shared experts, attention when the block is a decoder layer) are not routing.

    Raises MoeVizError naming a tensor that has E on an axis this tool does not know how to slice,
    or an integer expert table, so nothing is exported wrongly.
    """
    parent = layer.router_parent or layer.router
    router_prefix = next(name for name, m in layer.block.named_modules() if m is parent)
    scopes = [("", layer.block, False)] + [
        (f"{router_prefix}.{name}" if name else router_prefix, module, True) for name, module in parent.named_modules()]
    found = []
    for module_name, module, _ in scopes:
        for attribute, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            path = f"{module_name}.{attribute}" if module_name else attribute
            if tensor is not None and not tensor.is_floating_point() and tensor.dim() > 0:
                # e.g. DeepSeek-V4's hash layers route by a token-id -> expert-id table (`gate.tid2eid`):
                # masking logits cannot remove an expert there and renumbering would break the table.
                raise MoeVizError(f"{layer.name}.{path} is an integer table of expert ids (hash routing): "
                                  "pruning experts chosen by a table is not supported")
            sizes = [n for n in (layer.router_rows, layer.num_experts) if tensor is not None and n in tensor.shape]
            if tensor is None or tensor.dim() == 0 or not sizes:
                continue
            axis = next((a for a in (expert_axis(tuple(tensor.shape), n) for n in sizes) if a is not None), None)
            if axis is None:
                raise MoeVizError(f"{layer.name}.{path} has shape {tuple(tensor.shape)} with {sizes[0]} "
                                  "experts on an axis moe_viz does not know how to prune: this layout is not supported")
            found.append(RoutingTensor(path, module, attribute, axis, int(tensor.shape[axis])))
    return found
