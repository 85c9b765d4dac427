"""Per-layer accumulators for routing statistics (formulas: docs/METRICS.md).

Everything stays on the layer's own device with a size fixed by the expert
count E (counts int64, sums float64), so memory does not grow with the number
of calibration tokens and nothing is copied to the host until `to_frames()` at
the end of a run.

Why `add` looks the way it does (measured, bench/capture_overhead.py): at
hundreds of experts the cost is not the (T, k) index_adds but the passes over
the (T, E) router scores and, on CPU, fresh multi-MB temporaries, whose pages
the kernel must fault in again on every batch. So the (T, E) work is one
softmax, one max, one fused product and two cascade sums, written into work
buffers that live as long as the observer (`Scratch`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

EXPERT_COLUMNS = (
    "routed_tokens",
    "top1_tokens",
    "top1_prob_sum",
    "gate_sum",
    "prob_sum",
    "ean_sum",
    "ean_sq_sum",
    "ean_max",
    "reap_sum",
    "contribution_sum",
)
COUNT_COLUMNS = ("routed_tokens", "top1_tokens")
# Sums over routed (token, expert) pairs, accumulated by one index_add per batch.
PAIR_SUM_COLUMNS = ("gate_sum", "ean_sum", "ean_sq_sum", "reap_sum", "contribution_sum")
# (m - l) is clamped here: far below where float32 exp underflows (-104), so p (m - l) = 0 where p = 0.
LOGIT_GAP_CLAMP = 1e4


class Scratch:
    """Reusable work buffers, one per (name, device, dtype), grown on demand and never shrunk."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A (rows, cols) view of the buffer `name`; its contents are garbage."""
        key = (name, str(device), dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < rows * cols:
            buffer = self._buffers[key] = torch.empty(rows * cols, dtype=dtype, device=device)
        return buffer[: rows * cols].view(rows, cols)


def router_scores(logits: torch.Tensor, score_fn: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert router scores p (T, E) in float32: softmax, sigmoid or sqrt(softplus) of the logits
    (into `out` if given)."""
    logits = logits.float()
    if score_fn == "sqrtsoftplus":  # DeepSeek-V4; rare enough that the temporary does not matter
        return torch.sqrt(torch.nn.functional.softplus(logits), out=out)
    if out is None:
        return torch.sigmoid(logits) if score_fn == "sigmoid" else torch.softmax(logits, dim=-1)
    if score_fn == "sigmoid":
        return torch.sigmoid(logits, out=out)
    return torch.ops.aten._softmax.out(logits, -1, False, out=out)


def token_entropies(logits: torch.Tensor, p: torch.Tensor, score_fn: str, work: torch.Tensor) -> torch.Tensor:
    """H(q_t) of every token, (T,) float64, with q_t = p_t / Σ_e p_{t,e} (docs/METRICS.md).

    Softmax: ln p_e = (l_e - m) + ln p_max with m = max_e l_e (p_max = p at the
    argmax), so H = Σ_e p_e (m - l_e) - ln p_max: two non-negative terms, no
    cancellation however large the logits, and no elementwise log.
    Sigmoid, sqrt-softplus (scores that do not sum to 1): H = ln S - (Σ_e p ln p) / S
    with S = Σ_e p.
    `work` is a (T, E) float32 buffer that is overwritten. Row sums are float32
    cascade sums (relative error ~1e-7), combined in float64.
    """
    if score_fn != "softmax":
        p_log_p = torch.log(p, out=work).clamp_(min=torch.finfo(work.dtype).min).mul_(p).sum(dim=-1).double()
        total = p.sum(dim=-1).double()
        return total.log() - p_log_p / total
    # amax, not max: max also finds the argmax, 12x slower at (2048, 512) (0.63 vs 0.05 ms); softmax
    # is monotonic, so the largest p is p at the argmax (up to the last bit of exp's rounding).
    top = logits.amax(dim=-1, keepdim=True)
    gap_mass = torch.sub(top, logits, out=work).clamp_(max=LOGIT_GAP_CLAMP).mul_(p).sum(dim=-1).double()
    return gap_mass - p.amax(dim=-1).double().log()


def token_shift(block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
    """EASY-EP token weight s_t = max(0, 1 - cos(h_t, h_t + r_t)), shape (T,), float64.

    From three float32 row dots combined in float64 (hh = h·h, hr = h·r, rr = r·r;
    g = h + r, so h·g = hh + hr and |g|² = hh + 2hr + rr): no (T, H) temporaries,
    and the rounding of hh cancels in h·g / (|h||g|), so a tiny update r keeps its
    relative accuracy. s = 1 when h or g is zero (cos taken as 0, as torch does).
    """
    h = block_input.reshape(-1, block_input.shape[-1]).float()
    r = block_output.reshape(-1, block_output.shape[-1]).float()
    hh, hr, rr = (torch.linalg.vecdot(a, b).double() for a, b in ((h, h), (h, r), (r, r)))
    norms = (hh * (hh + 2 * hr + rr).clamp_min(0)).sqrt()
    cos = torch.where(norms > 0, (hh + hr) / norms, torch.zeros_like(norms))
    return (1 - cos).clamp_min(0)


def _count(counts: torch.Tensor, index: torch.Tensor) -> None:
    """counts[i] += number of times i occurs in `index` (int64; no device sync, unlike bincount on CUDA)."""
    counts.index_add_(0, index, torch.ones((), dtype=counts.dtype, device=counts.device).expand(index.numel()))


class LayerAccumulator:
    """Running sums for one MoE layer; `add` is called once per forward pass."""

    def __init__(self, layer: int, module_name: str, num_experts: int, score_fn: str, device: torch.device):
        self.layer = layer
        self.module_name = module_name
        self.num_experts = num_experts
        self.score_fn = score_fn
        self.top_k: int | None = None
        counts = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)  # noqa: E731
        sums = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.routed_tokens = counts(num_experts)
        self.top1_tokens = counts(num_experts)
        self.coactivation = counts(num_experts * num_experts)  # ordered pairs (a, b), flattened a * E + b
        self.tokens = counts(())
        self.pair_sums = sums(num_experts, len(PAIR_SUM_COLUMNS))
        self.top1_prob_sum = sums(num_experts)
        self.prob_sum = sums(num_experts)
        self.ean_max = sums(num_experts)
        self.entropy_sum = sums(())

    @torch.no_grad()
    def add(
        self,
        logits: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        expert_norms: torch.Tensor,
        shift: torch.Tensor,
        valid: torch.Tensor | None,
        real: torch.Tensor | None = None,
        *,
        scratch: Scratch | None = None,
    ) -> None:
        """Add one batch.

        Args:
            logits: (T, W) router logits: W = E, or more when the router also scores choices that are not
                routed experts (they follow the E expert columns; docs/METRICS.md).
            top_k_index: (T, k) experts the model routed each token to.
            top_k_weights: (T, k) gate weights the model applied.
            expert_norms: (T, k) ||f_e(x_t)|| for each routed pair.
            shift: (T,) EASY-EP token weight s_t.
            valid: (T,) 1 for real tokens, 0 for padding; None when every token is real.
            real: (T, k) True where the slot went to a routed expert; None when every slot did. Other
                slots (a LongCat identity expert, Zaya's skip) count for no expert.
            scratch: work buffers for the (T, E) passes, the observer's (it outlives one batch, not the
                run: an accumulator kept after its observer holds no buffers); None: fresh ones.
        """
        scratch = scratch if scratch is not None else Scratch()
        self.top_k = top_k_index.shape[1]
        if valid is not None:  # drop padding once instead of weighting every term by 0/1
            keep = valid.bool()
            logits, top_k_index, top_k_weights, expert_norms, shift = (
                t[keep] for t in (logits, top_k_index, top_k_weights, expert_norms, shift)
            )
            real = None if real is None else real[keep]
        num_tokens, k = top_k_index.shape
        num_experts = self.num_experts
        logits = logits.float()
        device = logits.device
        width = logits.shape[1]
        scores = router_scores(logits, self.score_fn, out=scratch.get("scores", num_tokens, width, device))
        p = scores if width == num_experts else scores[:, :num_experts]

        flat = top_k_index.reshape(-1)
        gate = top_k_weights.reshape(-1).double()
        norms = expert_norms.reshape(-1).double()
        shift_k = shift.double().repeat_interleave(k)
        if real is not None:
            slots = real.reshape(-1)
            flat, gate, norms, shift_k = flat[slots], gate[slots], norms[slots], shift_k[slots]
        reap = gate * norms
        # One index_add for every per-pair sum; columns in PAIR_SUM_COLUMNS order.
        self.pair_sums.index_add_(0, flat, torch.stack((gate, norms, norms * norms, reap, reap * shift_k), dim=1))
        self.ean_max.scatter_reduce_(0, flat, norms, reduce="amax", include_self=True)
        _count(self.routed_tokens, flat)
        self.prob_sum.add_(p.sum(dim=0).double())  # float32 cascade sum: relative error ~1e-7 at any T

        # Top-1 = the routed expert with the highest router score (first slot on ties).
        chosen = scores.gather(1, top_k_index.clamp(0, width - 1))
        if real is not None:
            chosen = chosen.masked_fill(~real, -math.inf)
        top1_prob, top1_slot = chosen.max(dim=1)
        top1_expert = top_k_index.gather(1, top1_slot[:, None]).squeeze(1)
        if real is not None:  # a token whose every slot went to a non-expert choice has no top-1 expert
            some = real.any(dim=1)
            top1_prob, top1_expert = top1_prob[some], top1_expert[some]
        self.top1_prob_sum.index_add_(0, top1_expert, top1_prob.double())
        _count(self.top1_tokens, top1_expert)

        # Ordered pairs (a, b) of every token's routed set, a == b included (to_frames keeps a < b).
        pairs = top_k_index[:, :, None] * num_experts + top_k_index[:, None, :]
        _count(self.coactivation, pairs.reshape(-1) if real is None else pairs[real[:, :, None] & real[:, None, :]])

        work = scratch.get("work", num_tokens, width, device)
        self.entropy_sum.add_(token_entropies(logits, scores, self.score_fn, work).sum())
        self.tokens.add_(num_tokens)

    def to_frames(self) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
        """Copy to host: (expert rows, layer row, co-activation rows with a < b and tokens > 0)."""
        pair_sums = self.pair_sums.cpu().numpy()
        columns = {
            "routed_tokens": self.routed_tokens.cpu().numpy(),
            "top1_tokens": self.top1_tokens.cpu().numpy(),
            "top1_prob_sum": self.top1_prob_sum.cpu().numpy(),
            "prob_sum": self.prob_sum.cpu().numpy(),
            "ean_max": self.ean_max.cpu().numpy(),
            **{name: pair_sums[:, i] for i, name in enumerate(PAIR_SUM_COLUMNS)},
        }
        experts = pd.DataFrame({name: columns[name] for name in EXPERT_COLUMNS})
        experts.insert(0, "expert", np.arange(self.num_experts))
        experts.insert(0, "layer", self.layer)
        tokens = int(self.tokens.item())
        layer_row = {
            "layer": self.layer,
            "module": self.module_name,
            "tokens": tokens,
            "num_experts": self.num_experts,
            "top_k": self.top_k or 0,
            "router_score": self.score_fn,
            "entropy_mean": self.entropy_sum.item() / tokens if tokens else 0.0,
        }
        matrix = self.coactivation.view(self.num_experts, self.num_experts).cpu().numpy()
        a, b = np.nonzero(np.triu(matrix, 1))  # row-major: a ascending, then b
        coact = pd.DataFrame(
            {
                "layer": self.layer,
                "expert_a": a.astype("int32"),
                "expert_b": b.astype("int32"),
                "tokens": matrix[a, b],
            }
        )
        return experts, layer_row, coact
