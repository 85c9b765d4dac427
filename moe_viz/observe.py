"""Observe a model's real routing while it runs, without changing its outputs.

For each MoE layer three things are watched:
- the router's output (a forward hook) gives the logits over all experts;
- the experts module gives the top-k indices and gate weights the model really
  applies (its positional arguments) and ||f_e(x)|| for each routed pair;
- the block's output (a forward hook) gives the EASY-EP token shift, and
  triggers accumulation.

||f_e(x)|| is computed only for routed (token, expert) pairs. For fused experts
the unweighted per-slot outputs come from the module's own implementation,
called with every token repeated k times, one expert each, weight 1:

- ``grouped_mm`` (the v5 default): the observer *replaces* the experts forward
  with that call followed by the same weighted reduction grouped_mm performs.
  The grouped GEMM sees exactly the same rows in the same order, so outputs are
  bit-identical and the extra cost is the norm and one reduction (~1.0x).
- any other implementation (eager, ...): the original forward runs untouched
  and the per-slot call is made once more in a hook (~2x expert compute).

Llama4 runs every expert densely on gated inputs, so its per-pair outputs are
read from the experts' own output rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import MoeLayer
from .routing_stats import LayerAccumulator, token_shift


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return values[0], values[1], values[2]


def slot_outputs(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, dtype: torch.dtype):
    """Unweighted expert outputs f_e(x_t) for every routed slot, shape (T*k, H).

    Uses the module's configured implementation (the class forward, so hooks
    are not re-entered) with each token repeated once per slot and weight 1.
    """
    num_tokens, k = top_k_index.shape
    ones = torch.ones(num_tokens * k, 1, dtype=dtype, device=hidden.device)
    repeated = hidden.repeat_interleave(k, dim=0)
    return type(experts).forward(experts, repeated, top_k_index.reshape(-1, 1), ones)


def _norms(rows: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    return torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).view(num_tokens, k)


class _LayerTap:
    """Hooks for one MoE layer; holds the pieces of the current forward pass."""

    def __init__(self, layer: MoeLayer, observer: "RoutingObserver"):
        self.layer = layer
        self.observer = observer
        device = layer.router.weight.device
        self.acc = LayerAccumulator(layer.layer, layer.name, layer.num_experts, layer.score_fn, device)
        self.handles: list = []
        self.replaced_forward = False
        self._clear()

    def _clear(self) -> None:
        self.logits = self.index = self.weights = self.norms = None

    # -- hooks -------------------------------------------------------------
    def on_router(self, module, args, output) -> None:
        logits = output[self.layer.logits_index] if isinstance(output, tuple) else output
        self.logits = logits.reshape(-1, self.layer.num_experts)
        if self.layer.adapter == "llama4":
            scores = output[0]
            self.index = torch.topk(self.logits, module.top_k, dim=1).indices
            self.weights = scores.gather(1, self.index)

    def tapped_forward(self, *args, **kwargs) -> torch.Tensor:
        hidden, index, weights = _routing_args(args, kwargs)
        experts = self.layer.experts
        num_tokens, k = index.shape
        rows = slot_outputs(experts, hidden, index, weights.dtype)
        self.index, self.weights, self.norms = index, weights, _norms(rows, num_tokens, k)
        # Same reduction as grouped_mm_experts_forward: weight, sum over slots, cast.
        return (rows.view(num_tokens, k, -1) * weights.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)

    def on_experts_recompute(self, module, args, kwargs, output) -> None:
        hidden, index, weights = _routing_args(args, kwargs)
        rows = slot_outputs(module, hidden, index, weights.dtype)
        self.index, self.weights, self.norms = index, weights, _norms(rows, *index.shape)

    def on_llama4_experts(self, module, args, output) -> None:
        num_tokens, k = self.index.shape
        rows_per_expert = output.shape[0] // self.layer.num_experts
        rows = output[(self.index * rows_per_expert + torch.arange(num_tokens, device=output.device)[:, None]).reshape(-1)]
        self.norms = _norms(rows, num_tokens, k)

    def on_block(self, module, args, kwargs, output) -> None:
        block_input = args[0] if args else next(iter(kwargs.values()))
        block_output = output[0] if isinstance(output, tuple) else output
        if self.logits is None or self.norms is None:
            raise RuntimeError(f"moe_viz saw {self.layer.name} run without its router or experts being observed")
        valid = self.observer.valid_on(self.logits.device, self.logits.shape[0])
        self.acc.add(
            self.logits, self.index, self.weights, self.norms, token_shift(block_input, block_output), valid
        )
        self._clear()

    # -- attach / detach -----------------------------------------------------
    def attach(self, fast: bool) -> None:
        layer = self.layer
        self.handles.append(layer.router.register_forward_hook(self.on_router))
        if layer.adapter == "llama4":
            self.handles.append(layer.experts.register_forward_hook(self.on_llama4_experts))
        elif fast and layer.experts.config._experts_implementation == "grouped_mm":
            if "forward" in vars(layer.experts):
                raise RuntimeError(f"{layer.name}.experts already has an instance forward (another tool's patch?)")
            layer.experts.forward = self.tapped_forward
            self.replaced_forward = True
        else:
            self.handles.append(
                layer.experts.register_forward_hook(self.on_experts_recompute, with_kwargs=True)
            )
        self.handles.append(layer.block.register_forward_hook(self.on_block, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.replaced_forward:
            del self.layer.experts.forward
            self.replaced_forward = False


class RoutingObserver:
    """Context manager: while active, each forward pass adds to per-layer accumulators.

    Call `set_attention_mask` before each forward so padding is excluded.
    ``fast=False`` forces the recompute path everywhere (for benchmarks/tests).
    """

    def __init__(self, layers: list[MoeLayer], fast: bool = True):
        self.taps = [_LayerTap(layer, self) for layer in layers]
        self.fast = fast
        self._valid: torch.Tensor | None = None
        self._valid_by_device: dict = {}

    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        self._valid = None if attention_mask is None else attention_mask.reshape(-1)
        self._valid_by_device = {}

    def valid_on(self, device: torch.device, num_tokens: int) -> torch.Tensor:
        if self._valid is None:
            return torch.ones(num_tokens, device=device)
        if self._valid.numel() != num_tokens:
            raise RuntimeError(
                f"attention mask covers {self._valid.numel()} tokens but the layer saw {num_tokens}"
            )
        key = str(device)
        if key not in self._valid_by_device:
            self._valid_by_device[key] = self._valid.to(device, non_blocking=True)
        return self._valid_by_device[key]

    @property
    def accumulators(self) -> list[LayerAccumulator]:
        return [tap.acc for tap in self.taps]

    def __enter__(self) -> "RoutingObserver":
        try:
            for tap in self.taps:
                tap.attach(self.fast)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for tap in self.taps:
            tap.detach()
