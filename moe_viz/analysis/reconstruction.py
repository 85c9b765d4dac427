"""Layer-local causal importance: how much a MoE block's output changes when experts are removed.

Each MoE block's inputs are recorded once, from a forward pass of the unpruned model
over a token sample. Replaying them through the block with some experts masked
(`masking.masked_layer`: the same reference exports are verified against) gives

    reconstruction_error(S) = Σ_t ‖y_t − y_{S,t}‖² / Σ_t ‖y_t‖²

over the real (non-padding) tokens t, where y is the block's output with every
expert and y_S its output when only the experts in S are kept. Tokens whose
top-k contained a removed expert are re-routed exactly as the family routes,
so this is the block's real output after pruning, not a sum of expert outputs.

- `expert_reconstruction_scores`: per expert, the error when that expert alone is
  dropped (a causal importance score; higher = more important).
- `enumerate_keep_sets` / `enumeration_plan`: per layer, the keep-set of a given size
  with the smallest error (Lu et al., ACL 2024): every subset when E ≤ 8 (per group
  for group-limited routers), greedy elimination beyond.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch
from torch import nn

from moe_viz.capture.run import padded_batches
from moe_viz.prune.masking import masked_layer
from moe_viz.errors import MoeVizError
from moe_viz.models.discovery import MoeLayer, find_moe_layers
from moe_viz.models.fingerprint import model_fingerprint
from moe_viz.prune.plan import PrunePlan, RouterConstraints, check_keep

EXACT_MAX_EXPERTS = 8  # enumerate every subset up to this many experts per layer (C(8, 4) = 70)


@dataclass
class LayerInputs:
    """The recorded inputs of one MoE block: one (args, kwargs, real-token mask) per call."""

    layer: int
    calls: list[tuple[tuple, dict, torch.Tensor]] = field(default_factory=list)
    _reference: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        return sum(int(mask.sum()) for _, _, mask in self.calls)


class RecordBlockInputs:
    """Forward pre-hooks that keep every MoE block's (args, kwargs) per decoder layer while open
    (`inputs[layer]`, one entry per call); a context manager that removes its hooks on exit."""

    def __init__(self, layers: list[MoeLayer]):
        self.inputs: dict[int, list[tuple]] = {layer.layer: [] for layer in layers}
        self.handles = [layer.block.register_forward_pre_hook(self._hook(layer.layer), with_kwargs=True)
                        for layer in layers]

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.inputs[index].append((tuple(map(detach, args)), {k: detach(v) for k, v in kwargs.items()}))
        return hook

    def __enter__(self) -> "RecordBlockInputs":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def take_tokens(sequences: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The leading sequences holding at most `max_tokens` tokens (the last one cut to fit)."""
    if max_tokens is None:
        return list(sequences)
    out, left = [], max_tokens
    for seq in sequences:
        if left <= 0:
            break
        out.append(seq[:left])
        left -= len(out[-1])
    return out


@torch.no_grad()
def record_block_inputs(model: nn.Module, sequences: list[list[int]], batch_size: int = 8,
                        max_tokens: int | None = None) -> dict[int, LayerInputs]:
    """Run the unpruned model once over `sequences` (at most `max_tokens` tokens) and keep each
    MoE block's inputs, with the attention mask of the batch (True = real token)."""
    sequences = [s for s in take_tokens(sequences, max_tokens) if s]
    if not sequences:
        raise MoeVizError("no tokens to record block inputs from")
    layers = find_moe_layers(model)
    device = model.get_input_embeddings().weight.device
    out = {layer.layer: LayerInputs(layer.layer) for layer in layers}
    with RecordBlockInputs(layers) as recorder:
        for ids, mask in padded_batches(sequences, batch_size):
            before = {index: len(calls) for index, calls in recorder.inputs.items()}
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            for index, calls in recorder.inputs.items():
                for args, kwargs in calls[before[index]:]:
                    out[index].calls.append((args, kwargs, mask.bool()))
    return out


def _real_rows(output, mask: torch.Tensor) -> torch.Tensor:
    """The block output's rows of real tokens, as float64 (T_real, H); (B, T, H) and (B·T, H) outputs."""
    output = output[0] if isinstance(output, (tuple, list)) else output
    flat = output.reshape(-1, output.shape[-1])
    if flat.shape[0] != mask.numel():
        raise MoeVizError(f"block output has {flat.shape[0]} rows for a batch of {mask.numel()} positions")
    return flat[mask.reshape(-1).to(flat.device)].double()


@torch.no_grad()
def block_outputs(layer: MoeLayer, inputs: LayerInputs, dropped: list[int] = ()) -> list[torch.Tensor]:
    """The block's output at the real tokens of each recorded call, with `dropped` experts masked."""
    out = []
    with masked_layer(layer, list(dropped)):
        for args, kwargs, mask in inputs.calls:
            out.append(_real_rows(layer.block(*args, **kwargs), mask))
    return out


def _reference(layer: MoeLayer, inputs: LayerInputs) -> list[torch.Tensor]:
    if inputs._reference is None:
        inputs._reference = block_outputs(layer, inputs)
    return inputs._reference


def reconstruction_error(layer: MoeLayer, inputs: LayerInputs, kept) -> float:
    """Σ_tokens ‖y − y_S‖² / Σ_tokens ‖y‖² over real tokens, S = `kept` expert ids of this layer."""
    kept = set(int(e) for e in kept)
    unknown = sorted(kept - set(range(layer.num_experts)))
    if unknown:
        raise MoeVizError(f"layer {layer.layer} has no expert(s) {unknown} (experts 0-{layer.num_experts - 1})")
    dropped = [e for e in range(layer.num_experts) if e not in kept]
    reference = _reference(layer, inputs)
    if not dropped:
        return 0.0
    pruned = block_outputs(layer, inputs, dropped)
    num = sum(float(((y - y_s) ** 2).sum()) for y, y_s in zip(reference, pruned))
    den = sum(float((y**2).sum()) for y in reference)
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def expert_reconstruction_scores(model: nn.Module, sequences: list[list[int]] | None = None, batch_size: int = 8,
                                 max_tokens: int | None = None,
                                 inputs: dict[int, LayerInputs] | None = None) -> pd.DataFrame:
    """Per (layer, expert): `recon_error`, the block's relative reconstruction error when that expert
    alone is dropped, and `tokens`, the real tokens it was measured on. Higher = more important.

    Give `sequences` (token ids; at most `max_tokens` are used) or already recorded `inputs`.
    """
    if inputs is None:
        if sequences is None:
            raise MoeVizError("give token sequences or recorded block inputs")
        inputs = record_block_inputs(model, sequences, batch_size, max_tokens)
    rows = []
    for layer in find_moe_layers(model):
        sample = inputs[layer.layer]
        everything = range(layer.num_experts)
        for expert in everything:
            error = reconstruction_error(layer, sample, [e for e in everything if e != expert])
            rows.append((layer.layer, expert, error, sample.tokens))
    frame = pd.DataFrame(rows, columns=["layer", "expert", "recon_error", "tokens"])
    frame.attrs["tokens"] = int(frame.tokens.max()) if len(frame) else 0
    return frame


# -- Lu et al. (ACL 2024): the keep-set with the smallest reconstruction error -------------

def _groups(num_experts: int, constraints: RouterConstraints) -> list[list[int]]:
    """Contiguous expert groups of a group-limited router (one group otherwise)."""
    groups = constraints.n_group if constraints.n_group > 1 else 1
    if num_experts % groups:
        raise MoeVizError(f"{num_experts} experts do not split into {groups} equal router groups")
    size = num_experts // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]


def _exact(error: Callable[[tuple[int, ...]], float], groups: list[list[int]], keep: int) -> tuple[tuple[int, ...], int]:
    """Every keep-set with keep/len(groups) experts in each group; the smallest error (then smallest ids)."""
    per_group = keep // len(groups)
    best, best_error, count = None, math.inf, 0
    for parts in itertools.product(*(itertools.combinations(g, per_group) for g in groups)):
        kept = tuple(sorted(e for part in parts for e in part))
        value = error(kept)
        count += 1
        if value < best_error:  # strict: ties keep the first (lexicographically smallest) set
            best, best_error = kept, value
    return best, count


def _greedy(error: Callable[[tuple[int, ...]], float], groups: list[list[int]], keep: int) -> tuple[tuple[int, ...], int]:
    """Start from every expert; repeatedly drop the one whose removal raises the error least,
    only from groups still holding more than keep/len(groups)."""
    per_group = keep // len(groups)
    group_of = {e: i for i, g in enumerate(groups) for e in g}
    kept = [e for g in groups for e in g]
    count = 0
    while len(kept) > keep:
        sizes = [sum(1 for k in kept if group_of[k] == i) for i in range(len(groups))]
        scored = []
        for e in kept:
            if sizes[group_of[e]] > per_group:
                scored.append((error(tuple(k for k in kept if k != e)), e))
                count += 1
        kept.remove(min(scored)[1])  # ties: the lower expert id
    return tuple(kept), count


def enumerate_keep_sets(model: nn.Module, inputs: dict[int, LayerInputs], keep: int,
                        constraints: RouterConstraints | None = None,
                        exact_max_experts: int = EXACT_MAX_EXPERTS) -> tuple[dict[int, list[int]], dict[int, dict]]:
    """Per MoE layer, the `keep` experts whose block output best reconstructs the unpruned one.

    Exact (every subset; per group for group-limited routers) when the layer has at most
    `exact_max_experts` experts, greedy elimination beyond. Returns (kept, info) with
    info[layer] = {"method": "exact"|"greedy", "recon_error", "subsets_evaluated"}.
    """
    constraints = constraints or RouterConstraints.from_config(model.config, 0)
    kept_sets, info = {}, {}
    for layer in find_moe_layers(model):
        check_keep(keep, layer.num_experts, constraints)
        sample = inputs[layer.layer]
        cache: dict[tuple[int, ...], float] = {}

        def error(kept: tuple[int, ...], layer=layer, sample=sample, cache=cache) -> float:
            if kept not in cache:
                cache[kept] = reconstruction_error(layer, sample, kept)
            return cache[kept]

        groups = _groups(layer.num_experts, constraints)
        method = "exact" if layer.num_experts <= exact_max_experts else "greedy"
        best, count = (_exact if method == "exact" else _greedy)(error, groups, keep)
        kept_sets[layer.layer] = list(best)
        info[layer.layer] = {"method": method, "recon_error": error(best), "subsets_evaluated": count,
                             "tokens": sample.tokens}
    return kept_sets, info


def enumeration_plan(model: nn.Module, inputs: dict[int, LayerInputs], keep: int,
                     template: PrunePlan | None = None, constraints: RouterConstraints | None = None,
                     exact_max_experts: int = EXACT_MAX_EXPERTS) -> tuple[PrunePlan, dict[int, dict]]:
    """`enumerate_keep_sets` as a uniform PrunePlan (criterion "enumeration").

    Provenance (model id, fingerprint, domains, run ids, checkpoint digest) comes from
    `template` (e.g. a plan built from the same store), else from the loaded model.
    """
    kept, info = enumerate_keep_sets(model, inputs, keep, constraints, exact_max_experts)
    num_experts = {layer.layer: layer.num_experts for layer in find_moe_layers(model)}
    total = sum(num_experts.values())
    if template is None:
        template = PrunePlan(model_id=str(getattr(model.config, "_name_or_path", "") or ""),
                             model_fingerprint=model_fingerprint(model), criterion="", scope="uniform",
                             sparsity=0.0, domains={}, run_ids={}, num_experts=num_experts, kept={})
    plan = PrunePlan(**{**vars(template), "criterion": "enumeration", "scope": "uniform", "kept": kept,
                        "num_experts": num_experts, "protected": {},
                        "sparsity": (total - sum(map(len, kept.values()))) / total})
    return plan, info
