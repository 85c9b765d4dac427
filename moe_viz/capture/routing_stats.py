"""Per-layer accumulators for routing statistics (formulas: docs/METRICS.md).

Everything stays on the layer's own device in float64 with a size fixed by the
expert count E, so memory does not grow with the number of calibration tokens
and nothing is copied to the host until `to_frames()` at the end of a run.
"""

from __future__ import annotations

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


def router_scores(logits: torch.Tensor, score_fn: str) -> torch.Tensor:
    """Per-expert router scores p (T, E) in float32: softmax or sigmoid of the logits."""
    logits = logits.float()
    if score_fn == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def token_shift(block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
    """EASY-EP token weight s_t = max(0, 1 - cos(h_t, h_t + r_t)), shape (T,), float32."""
    h = block_input.reshape(-1, block_input.shape[-1]).float()
    r = block_output.reshape(-1, block_output.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(h, h + r, dim=-1, eps=1e-8)
    return (1.0 - cos).clamp_min(0.0)


class LayerAccumulator:
    """Running sums for one MoE layer; `add` is called once per forward pass."""

    def __init__(self, layer: int, module_name: str, num_experts: int, score_fn: str, device: torch.device):
        self.layer = layer
        self.module_name = module_name
        self.num_experts = num_experts
        self.score_fn = score_fn
        self.top_k: int | None = None
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.sums = {name: zeros(num_experts) for name in EXPERT_COLUMNS}
        self.coactivation = zeros(num_experts * num_experts)
        self.tokens = zeros(())
        self.entropy_sum = zeros(())

    @torch.no_grad()
    def add(
        self,
        logits: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        expert_norms: torch.Tensor,
        shift: torch.Tensor,
        valid: torch.Tensor,
    ) -> None:
        """Add one batch.

        Args:
            logits: (T, E) router logits.
            top_k_index: (T, k) experts the model routed each token to.
            top_k_weights: (T, k) gate weights the model applied.
            expert_norms: (T, k) ||f_e(x_t)|| for each routed pair.
            shift: (T,) EASY-EP token weight s_t.
            valid: (T,) 1 for real tokens, 0 for padding.
        """
        num_tokens, k = top_k_index.shape
        num_experts = self.num_experts
        self.top_k = k
        s = self.sums
        v = valid.to(torch.float64)
        vk = v[:, None].expand(num_tokens, k).reshape(-1)
        flat = top_k_index.reshape(-1)
        p = router_scores(logits, self.score_fn)

        s["routed_tokens"].index_add_(0, flat, vk)
        s["gate_sum"].index_add_(0, flat, top_k_weights.reshape(-1).double() * vk)
        s["prob_sum"].add_((p.double() * v[:, None]).sum(dim=0))

        # Top-1 = the routed expert with the highest router score (first slot on ties).
        p_routed = p.gather(1, top_k_index)
        top1_prob, top1_slot = p_routed.max(dim=1)
        top1_expert = top_k_index.gather(1, top1_slot[:, None]).squeeze(1)
        s["top1_tokens"].index_add_(0, top1_expert, v)
        s["top1_prob_sum"].index_add_(0, top1_expert, top1_prob.double() * v)

        norms = expert_norms.reshape(-1).double() * vk
        reap = norms * top_k_weights.reshape(-1).double()
        s["ean_sum"].index_add_(0, flat, norms)
        s["ean_sq_sum"].index_add_(0, flat, norms * norms)
        s["ean_max"].scatter_reduce_(0, flat, norms, reduce="amax", include_self=True)
        s["reap_sum"].index_add_(0, flat, reap)
        shift_k = shift.double()[:, None].expand(num_tokens, k).reshape(-1)
        s["contribution_sum"].index_add_(0, flat, reap * shift_k)

        pair = (top_k_index[:, :, None] * num_experts + top_k_index[:, None, :]).reshape(-1)
        self.coactivation.index_add_(0, pair, v[:, None].expand(num_tokens, k * k).reshape(-1))

        q = p / p.sum(dim=-1, keepdim=True)
        entropy = -torch.special.xlogy(q, q).sum(dim=-1)
        self.entropy_sum.add_((entropy.double() * v).sum())
        self.tokens.add_(v.sum())

    def to_frames(self) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
        """Copy to host: (expert rows, layer row, co-activation rows with a < b and tokens > 0)."""
        experts = pd.DataFrame({name: t.cpu().numpy() for name, t in self.sums.items()})
        for name in COUNT_COLUMNS:
            experts[name] = experts[name].round().astype("int64")
        experts.insert(0, "expert", range(self.num_experts))
        experts.insert(0, "layer", self.layer)
        tokens = int(round(self.tokens.item()))
        layer_row = {
            "layer": self.layer,
            "module": self.module_name,
            "tokens": tokens,
            "num_experts": self.num_experts,
            "top_k": self.top_k or 0,
            "router_score": self.score_fn,
            "entropy_mean": self.entropy_sum.item() / tokens if tokens else 0.0,
        }
        matrix = self.coactivation.view(self.num_experts, self.num_experts).round().to(torch.int64).cpu()
        a, b = torch.triu_indices(self.num_experts, self.num_experts, offset=1)
        counts = matrix[a, b]
        keep = counts > 0
        coact = pd.DataFrame(
            {
                "layer": self.layer,
                "expert_a": a[keep].numpy().astype("int32"),
                "expert_b": b[keep].numpy().astype("int32"),
                "tokens": counts[keep].numpy(),
            }
        )
        return experts, layer_row, coact
