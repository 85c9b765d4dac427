"""The router's score function: how a MoE block turns its router logits into per-expert scores.

Softmax, sigmoid or sqrt(softplus) (DeepSeek-V4). `probe_score_fn` runs the real router once and tells
from what it returns; the config's `scoring_func`, else a family-name list, is only the last resort
(`_score_fn_hint`). It decides the probability statistics (docs/METRICS.md), never the counts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from moe_viz.models.discovery import MoeLayer

# Last resort for the router's score function, used only where the probe through the real router
# (`probe_score_fn`) cannot tell (a router that returns no top-k, a score that is neither softmax nor
# sigmoid) and the config names none (`scoring_func`): families whose modeling code scores with a sigmoid.
SIGMOID_ROUTER_FAMILIES = {"deepseek_v3", "glm4_moe", "dots1", "minimax_m2", "llama4_text", "llama4"}
SCORE_FNS = ("softmax", "sigmoid", "sqrtsoftplus")  # sqrtsoftplus: sqrt(softplus(z)) (DeepSeek-V4)


def _score_fn_hint(model_type: str, config) -> str:
    """The documented last resort: the config's `scoring_func`, else the family-name list, else softmax."""
    named = getattr(config, "scoring_func", None)
    if named in SCORE_FNS:
        return named
    return "sigmoid" if model_type in SIGMOID_ROUTER_FAMILIES else "softmax"


PROBE_TOKENS = 32
PROBE_TOLERANCE = 1e-3  # in log space; routers compute in float32 (~1e-6), a wrong function is off by O(1)


@torch.no_grad()
def probe_score_fn(layer: "MoeLayer") -> str | None:
    """Which score function the real router applies: one of SCORE_FNS, or None when it cannot tell.

    Runs the router container once on random hidden states and compares the top-k weights it returns
    with softmax, sigmoid and sqrt(softplus) of its logits at the chosen experts. Renormalisation over
    the k, a scaling factor, or normalising together with shared experts multiply one token's weights by one number, so
    for the right function log(weight) - log(score) is the same for every slot of a token; for the wrong
    one it is not (any two differ by a per-expert term). Slots with weight 0 (a skip choice)
    are ignored. When several functions fit every token (top-1, or weights all equal after renormalising),
    the one whose offset is also the same across tokens wins; if still several or none fit (PhiMoE's
    sparsemixer, a router that returns no top-k), None.
    """
    container = layer.router_parent or layer.router
    own = getattr(container, "weight", None)
    linear = next((m for m in container.modules() if isinstance(m, nn.Linear)), None)
    width = own.shape[1] if isinstance(own, torch.Tensor) and own.dim() == 2 else getattr(linear, "in_features", None)
    if width is None:
        return None
    weight = layer.router.weight
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(PROBE_TOKENS, width, generator=generator).to(weight.device, weight.dtype)
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        out = None
        for shaped in (hidden, hidden[None]):  # the flattened tokens a block passes, else (1, T, H) (Zaya)
            try:
                out = container(shaped)
                break
            except Exception:  # noqa: BLE001 - a router needing more than hidden states: the hint decides
                seen.clear()
    finally:
        handle.remove()
    if out is None:
        return None
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    # The logits are what the router's linear returned (Gemma-4's router returns probabilities first);
    # a router that uses its linear's weight without calling it (LongCat-Flash) returns them first.
    logits = seen[0] if seen else outputs[0]
    logits = logits[layer.logits_index] if isinstance(logits, (tuple, list)) else logits
    found = _routing_outputs(outputs, logits, layer)
    if found is None:
        return None
    return classify_score_fn(*found)


def classify_score_fn(logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> str | None:
    """`probe_score_fn`'s test on (T, W) logits and the (T, k) weights and index the model used with them.

    The tolerance follows the weights' precision (bfloat16 weights are rounded to ~4e-3)."""
    tolerance = max(PROBE_TOLERANCE, 4 * torch.finfo(weights.dtype).eps)
    logits, weights = logits.double(), weights.double()
    real = weights > 0
    rows = real.any(dim=1)
    if not bool(rows.any()):
        return None
    log_w = torch.where(real, weights.clamp_min(1e-300).log(), torch.zeros_like(weights))
    per_token, across = [], []
    candidates = (("softmax", torch.log_softmax(logits, dim=-1)), ("sigmoid", F.logsigmoid(logits)),
                  ("sqrtsoftplus", 0.5 * F.softplus(logits).log()))
    for name, log_score in candidates:
        offset = log_w - log_score.gather(1, index.clamp(0, logits.shape[-1] - 1))
        high = torch.where(real, offset, torch.full_like(offset, -math.inf)).amax(dim=1)[rows]
        low = torch.where(real, offset, torch.full_like(offset, math.inf)).amin(dim=1)[rows]
        if bool(((high - low) < tolerance).all()):
            per_token.append(name)
            if float(high.max() - low.min()) < tolerance:
                across.append(name)
    if len(per_token) == 1:
        return per_token[0]
    return across[0] if len(per_token) > 1 and len(across) == 1 else None


def _routing_outputs(outputs, logits, layer: "MoeLayer"):
    """(logits (T, W), top-k weights (T, k), top-k index (T, k)) from a router's outputs, or None."""
    tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
    if not isinstance(logits, torch.Tensor) or logits.numel() != PROBE_TOKENS * logits.shape[-1]:
        return None
    logits = logits.reshape(PROBE_TOKENS, -1)
    index = next((t for t in tensors if not t.is_floating_point() and t.numel() % PROBE_TOKENS == 0), None)
    if index is None:
        if layer.adapter != "llama4":
            return None  # a router that returns only logits (DBRX): the block picks the experts
        # Llama4's router returns (scores scattered at its top-k, logits): the chosen experts are the top-k.
        index = torch.topk(logits, layer.router_parent.top_k, dim=1).indices
        return logits, outputs[0].reshape(PROBE_TOKENS, -1).gather(1, index), index
    index = index.reshape(PROBE_TOKENS, -1)
    weights = next((t for t in tensors if t.is_floating_point() and t.numel() == index.numel()), None)
    return None if weights is None else (logits, weights.reshape(PROBE_TOKENS, -1), index)
