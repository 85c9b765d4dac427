"""Observe a model's real routing while it runs, without changing its outputs.

For each MoE layer three things are watched:
- the router's output (a forward hook) gives the logits over all experts;
- the experts module gives the top-k indices and gate weights the model really
  applies (its positional arguments) and ||f_e(x)|| for each routed pair;
- the block's output (a forward hook) gives the EASY-EP token shift, and
  triggers accumulation.

||f_e(x)|| is computed only for routed (token, expert) pairs, with the experts
module's own kernels:

- ``grouped_mm`` (the v5 default): the observer *replaces* the experts forward
  with the same sequence of operations as transformers' grouped_mm forward,
  split where the unweighted per-slot outputs exist so their norms can be
  taken. The GEMMs see exactly the same rows in the same order, so outputs are
  bit-identical and the extra cost is one norm over (T*k, H); on the CPU its
  (T*k, H) temporaries live in reused buffers, which saves more than that.
- any other implementation (eager, ...): the original forward runs untouched,
  and a hook calls the module's implementation once more with every token
  repeated k times, one expert each, weight 1 (~2x expert compute).

Llama4 runs every expert densely on gated inputs, so its per-pair outputs are
read from the experts' own output rows. Switch-Transformers / NLLB-MoE (``dispatch``) call
``expert_i`` modules with a dispatch mask: the mask gives the routing, each routed token
is run through its expert once more for ||f_e(x)||, and the rows each expert really ran
must equal the rows the mask sent it (else capture refuses: the statistics would not
describe what the model computes). JetMoE's MLP and attention experts (``sorted``) run on
rows sorted by expert: the gating returns the sort order and gates, and the output
projection's rows are the unweighted per-slot outputs, put back in slot order (for an
attention expert: its output projection of its own query heads' attention, before the
gate and the shared bias); the attention module's forward ends the attention block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import MoeLayer, dispatch_experts
from moe_viz.models.score_fn import classify_score_fn
from moe_viz.capture.routing_stats import LayerAccumulator, Scratch, token_shift

try:  # private helper of transformers' grouped_mm experts forward; the fast path mirrors that forward
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - other transformers versions use the recompute path
    _grouped_linear = None


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
    index = top_k_index.reshape(-1, 1)
    try:
        return type(experts).forward(experts, repeated, index, ones)
    except (ValueError, RuntimeError, IndexError):
        # A forward that squeezes a top-k dim of 1 (LongCat-Flash): two slots, the same expert twice, weights
        # 1 and 0, give f_e(x) + 0 * f_e(x) = f_e(x) exactly.
        return type(experts).forward(experts, repeated, index.expand(-1, 2), torch.cat((ones, ones * 0), dim=1))


def grouped_slot_outputs(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                         scratch: Scratch | None = None):
    """transformers' grouped_mm experts forward, stopped before the gate weights.

    Returns (rows, perm): the unweighted outputs f_e(x_t) of every routed slot,
    shape (T*k, H), sorted by expert, and the permutation that sorted them
    (slot i of the flattened (T, k) routing is row ``inverse(perm)[i]``).
    Every operation mirrors `grouped_mm_experts_forward` in transformers 5.x so
    the final reduction in `grouped_experts_forward` reproduces its output bit
    for bit (checked by tests/test_capture_exact.py for every family).
    With `scratch`, the gathered (T*k, H) inputs go into its buffer "slot rows"
    (the same values; `grouped_experts_forward` says why), which the first GEMM
    has read by the time the caller reuses it.
    """
    num_top_k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    if scratch is None:
        rows = hidden[perm // num_top_k]
    else:
        rows = torch.index_select(hidden, 0, perm // num_top_k, out=scratch.get(
            "slot rows", perm.numel(), hidden.shape[-1], hidden.device, hidden.dtype))
    on_host = hidden.device.type in ("cpu", "mps")
    counts = torch.histc(
        expert_ids.float() if on_host else expert_ids.int(), bins=experts.num_experts, min=0, max=experts.num_experts - 1
    )
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up_weight = experts.gate_up_proj if experts.has_gate else experts.up_proj
    up_bias = None
    if experts.has_bias:
        up_bias = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[expert_ids]
    rows = _grouped_linear(rows, up_weight, offsets, bias=up_bias, is_transposed=experts.is_transposed)
    rows = experts._apply_gate(rows) if experts.has_gate else experts.act_fn(rows)
    down_bias = experts.down_proj_bias[expert_ids] if experts.has_bias else None
    rows = _grouped_linear(rows, experts.down_proj, offsets, bias=down_bias, is_transposed=experts.is_transposed)
    if experts.has_post_expert_norm:
        rows = experts.post_expert_norm(rows)
    return rows, perm


def grouped_experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor, scratch: Scratch | None = None,
                            on_slot_outputs: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """transformers' grouped_mm experts forward, bit for bit: (T, H) from hidden (T, H) and the routing (T, k).

    `on_slot_outputs(rows, inverse)` sees the unweighted outputs f_e(x_t) (T*k, H),
    sorted by expert (slot i is row inverse[i]), before they are weighted.

    With `scratch` (on the CPU) the three (T*k, H) temporaries of transformers'
    forward (the gathered inputs, the weighted rows, the rows in slot order) use
    one buffer that lives as long as the scratch: a fresh one is above glibc's
    mmap threshold (32 MiB at T*k = 16,384, H = 512, float32), so every call maps
    it anew and faults in each page, ~12 ms per 32 MiB on the bench VM, more than
    the routing statistics cost (bench/capture_overhead.py --paired). The values
    are the same (a gather, an elementwise product). On a GPU the caching
    allocator already reuses memory, and a held buffer would only raise the peak.
    """
    num_tokens, k = top_k_index.shape
    rows, perm = grouped_slot_outputs(experts, hidden, top_k_index, scratch)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    if on_slot_outputs is not None:
        on_slot_outputs(rows, inverse)
    # The rest of grouped_mm_experts_forward: weight, restore order, sum over slots, cast.
    slot_weights = top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    if scratch is None or torch.result_type(rows, slot_weights) != rows.dtype:
        weighted = (rows * slot_weights)[inverse]
    else:  # `rows` is this forward's own GEMM output: weighting it in place changes no value
        weighted = torch.index_select(rows.mul_(slot_weights), 0, inverse, out=scratch.get(
            "slot rows", rows.shape[0], rows.shape[1], rows.device, rows.dtype))
    return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden.dtype)


def _fast_path_available(experts: nn.Module) -> bool:
    return (
        _grouped_linear is not None
        and experts.config._experts_implementation == "grouped_mm"
        and not experts._is_expert_parallel
    )


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
        self.score_fn_settled = layer.probed_score_fn is not None
        self._clear()

    def _clear(self) -> None:
        self.logits = self.index = self.weights = self.norms = None

    # -- hooks -------------------------------------------------------------
    def on_router(self, module, args, output) -> None:
        logits = output[self.layer.logits_index] if isinstance(output, tuple) else output
        self.logits = logits.reshape(-1, logits.shape[-1])  # E columns, or the router's rows (extra choices)
        if self.layer.adapter == "llama4":
            scores = output[0]
            self.index = torch.topk(self.logits, module.top_k, dim=1).indices
            self.weights = scores.gather(1, self.index)

    def on_router_container(self, module, args, output) -> None:
        """A router that computes its logits with `F.linear(x, self.<linear>.weight)` never calls the linear
        (LongCat-Flash): its logits are then the container's first output with E or router-rows columns."""
        if self.logits is not None:
            return
        widths = (self.layer.num_experts, self.layer.router_rows)
        first = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(first, torch.Tensor) and first.is_floating_point() and first.shape[-1] in widths:
            self.logits = first.reshape(-1, first.shape[-1])

    def real_slots(self) -> torch.Tensor | None:
        """(T, k) True where a slot went to a routed expert; None when all did (the usual case).

        A router whose logits score more choices than routed experts can route a slot to a choice that is
        not an expert: LongCat-Flash's identity "zero" experts (index >= E) and Zaya's skip choice (passed
        to the experts as index 0 with weight exactly 0, so it adds nothing). Those slots are not counted
        for any expert (docs/METRICS.md)."""
        if self.logits.shape[-1] <= self.layer.num_experts:
            return None
        real = (self.index < self.layer.num_experts) & (self.weights != 0)
        return None if bool(real.all()) else real

    def settle_score_fn(self, valid: torch.Tensor | None) -> None:
        """Where the probe through the router could not tell (a router that returns only logits, or that
        needs more than hidden states), the first batch's logits and the weights the experts really got
        decide the score function, by the same test (`classify_score_fn`); the hint stays if it cannot."""
        self.score_fn_settled = True
        keep = slice(None) if valid is None else valid.bool()
        found = classify_score_fn(self.logits[keep], self.weights[keep], self.index[keep])
        if found is not None:
            self.layer.probed_score_fn = self.acc.score_fn = found

    def tapped_forward(self, *args, **kwargs) -> torch.Tensor:
        hidden, index, weights = _routing_args(args, kwargs)
        num_tokens, k = index.shape

        def take_norms(rows: torch.Tensor, inverse: torch.Tensor) -> None:
            self.norms = _norms(rows, num_tokens * k, 1)[inverse].view(num_tokens, k)

        self.index, self.weights = index, weights
        scratch = self.observer.scratch if hidden.device.type == "cpu" else None
        return grouped_experts_forward(self.layer.experts, hidden, index, weights, scratch, take_norms)

    def on_experts_recompute(self, module, args, kwargs, output) -> None:
        hidden, index, weights = _routing_args(args, kwargs)
        rows = slot_outputs(module, hidden, index, weights.dtype)
        self.index, self.weights, self.norms = index, weights, _norms(rows, *index.shape)

    def on_llama4_experts(self, module, args, output) -> None:
        num_tokens, k = self.index.shape
        rows_per_expert = output.shape[0] // self.layer.num_experts
        rows = output[(self.index * rows_per_expert + torch.arange(num_tokens, device=output.device)[:, None]).reshape(-1)]
        self.norms = _norms(rows, num_tokens, k)

    def on_sorted_router(self, module, args, output) -> None:
        # JetMoE-style gating: (slot order sorted by expert, token of each sorted row, gate of each sorted row,
        # rows per expert, logits); slot i of the flattened (T, k) top-k is sorted row inverse(order)[i].
        self.sorted_routing = output[0], output[2], output[3]

    def on_sorted_experts(self, module, args, output) -> None:
        order, gates, expert_size = self.sorted_routing
        num_tokens = self.logits.shape[0]
        k = order.numel() // num_tokens
        experts = torch.repeat_interleave(torch.arange(len(expert_size), device=order.device),
                                          torch.as_tensor(expert_size, device=order.device))
        index = torch.empty_like(order)
        index[order] = experts
        weights = torch.empty_like(gates)
        weights[order] = gates
        norms = torch.empty(order.numel(), dtype=torch.float32, device=order.device)
        norms[order] = _norms(output, order.numel(), 1).view(-1)
        self.index, self.weights, self.norms = index.view(num_tokens, k), weights.view(num_tokens, k), norms.view(num_tokens, k)

    def on_dispatched_rows(self, module, args, output) -> None:
        if self.counting:
            self.ran_rows[self.expert_ids[id(module)]] += args[0].shape[0]

    def on_dispatch_experts(self, module, args, kwargs, output) -> None:
        hidden, mask, weights = _routing_args(args, kwargs)
        num_tokens, num_experts = hidden.shape[0], self.layer.num_experts
        chosen = mask.reshape(num_tokens, -1, num_experts) != 0  # (T, k, E): the experts each slot is sent to
        sent = chosen.sum(dim=(0, 1)).tolist()
        ran, self.ran_rows = self.ran_rows, [0] * num_experts
        if ran != sent:
            raise MoeVizError(
                f"{self.layer.name}.experts ran rows {ran} per expert for the rows its router sent {sent}: its forward "
                "does not follow its router (NLLB-MoE in transformers 5.23 reads its 0/1 dispatch mask as expert ids, "
                "so only expert_0 and expert_1 ever run), so routing statistics would be meaningless: not captured")
        k = chosen.shape[1]
        routed = chosen.any(dim=-1)  # (T, k); a slot dropped for capacity keeps its router's choice, with gate 0
        index = torch.where(routed, chosen.int().argmax(dim=-1), self.logits.argmax(dim=-1, keepdim=True).expand(-1, k))
        if weights.numel() == num_tokens * num_experts:  # per-expert combine weights (T, E)
            weights = (weights.reshape(num_tokens, 1, num_experts) * chosen).sum(dim=-1)
        else:
            weights = weights.reshape(num_tokens, k) * routed
        norms = torch.zeros(num_tokens, k, dtype=torch.float32, device=hidden.device)
        self.counting = False
        try:
            for expert in index.unique().tolist():
                where = index == expert
                rows = self.experts_list[expert](hidden[where.nonzero()[:, 0]])
                norms[where] = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)
        finally:
            self.counting = True
        self.index, self.weights, self.norms = index, weights, norms

    def on_block(self, module, args, kwargs, output) -> None:
        block_input = args[0] if args else next(iter(kwargs.values()))
        block_output = output[0] if isinstance(output, tuple) else output
        if block_output.dim() == 1 and block_output.numel() == block_input.numel():
            block_output = block_output.view(block_input.shape)  # returned flattened (Ernie-4.5-VL's text_moe)
        if self.logits is None or self.norms is None:
            raise RuntimeError(f"moe_viz saw {self.layer.name} run without its router or experts being observed")
        valid = self.observer.valid_on(self.logits.device, self.logits.shape[0])
        real = self.real_slots()
        if not self.score_fn_settled:
            self.settle_score_fn(valid)
        if self.observer.tracer is not None:  # token-level trace (capture/trace.py); -1: not a routed expert
            index = self.index if real is None else self.index.masked_fill(~real, -1)
            self.observer.tracer.add(self.layer.layer, index, self.weights)
        self.acc.add(self.logits, self.index, self.weights, self.norms, token_shift(block_input, block_output), valid,
                     real, scratch=self.observer.scratch)
        self._clear()

    # -- attach / detach -----------------------------------------------------
    def attach(self, fast: bool) -> None:
        layer = self.layer
        self.handles.append(layer.router.register_forward_hook(self.on_router))
        if layer.router_parent is not None and layer.router_parent is not layer.router:
            self.handles.append(layer.router_parent.register_forward_hook(self.on_router_container))
        if layer.adapter == "llama4":
            self.handles.append(layer.experts.register_forward_hook(self.on_llama4_experts))
        elif layer.adapter == "dispatch":
            self.experts_list = dispatch_experts(layer.experts)
            self.expert_ids = {id(m): i for i, m in enumerate(self.experts_list)}
            self.ran_rows, self.counting = [0] * layer.num_experts, True
            self.handles += [m.register_forward_hook(self.on_dispatched_rows) for m in self.experts_list]
            self.handles.append(layer.experts.register_forward_hook(self.on_dispatch_experts, with_kwargs=True))
        elif layer.adapter == "sorted":
            self.handles.append(layer.router_parent.register_forward_hook(self.on_sorted_router))
            self.handles.append(layer.experts.register_forward_hook(self.on_sorted_experts))
        elif fast and layer.adapter == "fused" and _fast_path_available(layer.experts):
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


class TextNeverReaches:
    """Context manager: fail the forward pass if a block that capture leaves alone (another modality's
    experts, `models.discovery.other_modality_blocks`) runs on any token, so no routed token goes unobserved."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self.blocks = blocks
        self.handles: list = []

    def __enter__(self) -> "TextNeverReaches":
        for name, block in self.blocks:
            def refuse(module, args, name=name):
                raise MoeVizError(f"{name} ran during a text-only capture: moe_viz observes only the text experts "
                                  "of this model, so it cannot capture these inputs")
            self.handles.append(block.register_forward_pre_hook(refuse))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class RoutingObserver:
    """Context manager: while active, each forward pass adds to per-layer accumulators.

    Call `set_attention_mask` before each forward so padding is excluded.
    ``fast=False`` forces the recompute path everywhere (for benchmarks/tests).
    ``tracer`` (a capture.trace.TokenTracer) also receives each layer's routing.
    ``scratch``: work buffers to use (and keep) instead of the observer's own.
    """

    def __init__(self, layers: list[MoeLayer], fast: bool = True, tracer=None, scratch: Scratch | None = None):
        # Work buffers shared by the layers, which run one after another; they go with the observer (the
        # accumulators it hands out keep none). A caller that makes one observer after another (layer-wise
        # capture: one per layer and domain) passes one `scratch` to all, so the buffers are not made anew
        # for each: interleaved with the hidden states, that grew the heap layer by layer.
        self.scratch = scratch if scratch is not None else Scratch()
        self.taps = [_LayerTap(layer, self) for layer in layers]
        self.fast = fast
        self.tracer = tracer
        self._valid: torch.Tensor | None = None
        self._all_valid = True
        self._valid_by_device: dict = {}

    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        self._valid = None if attention_mask is None else attention_mask.reshape(-1)
        # A mask without padding is the common case (packed sequences): say so once, on the host.
        self._all_valid = self._valid is None or (self._valid.device.type == "cpu" and bool(self._valid.all()))
        self._valid_by_device = {}

    def valid_on(self, device: torch.device, num_tokens: int) -> torch.Tensor | None:
        """(T,) 1 for real tokens, 0 for padding, on `device`; None when every token is real."""
        if self._valid is not None and self._valid.numel() != num_tokens:
            raise MoeVizError(
                f"moe_viz cannot observe yet a MoE layer that sees {num_tokens} tokens for {self._valid.numel()} "
                "input tokens: this model runs its MoE on more than the text (e.g. block diffusion)"
            )
        if self._all_valid:
            return None
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
