"""How expert use differs between calibration domains (formulas: docs/METRICS.md).

All functions take `expert_stats` rows of several runs (with a `domain` column,
as returned by `store.expert_stats`) and work per layer.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd


def domain_shares(stats: pd.DataFrame) -> pd.DataFrame:
    """share = routed_tokens / Σ_e routed_tokens, per (domain, layer): columns domain, layer, expert, share."""
    total = stats.groupby(["domain", "layer"])["routed_tokens"].transform("sum").astype(float)
    share = (stats["routed_tokens"] / total.where(total > 0)).fillna(0.0)
    return stats[["domain", "layer", "expert"]].assign(share=share.to_numpy())


def mutual_information(stats: pd.DataFrame) -> pd.Series:
    """I(domain; expert) in nats per layer, domains weighted equally.

    p(e | d) is the domain's routed share; p(d) = 1/|D|; p(e) = mean_d p(e | d).
    """
    shares = domain_shares(stats)
    out = {}
    for layer, group in shares.groupby("layer"):
        table = group.pivot(index="domain", columns="expert", values="share").to_numpy()
        marginal = table.mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(table > 0, table * np.log(table / marginal), 0.0)
        out[layer] = terms.sum() / table.shape[0]
    return pd.Series(out, name="mutual_information")


def specific_experts(stats: pd.DataFrame, domain: str, count: int) -> dict[int, list[int]]:
    """Per layer, the `count` experts most used by `domain` relative to the other domains
    (largest share_D(e) − mean over other domains of share(e); ties to the lower index)."""
    shares = domain_shares(stats)
    table = shares.pivot_table(index=["layer", "expert"], columns="domain", values="share").fillna(0.0)
    others = [d for d in table.columns if d != domain]
    lift = table[domain] - (table[others].mean(axis=1) if others else 0.0)
    lift = lift.rename("lift").reset_index().sort_values(["layer", "lift", "expert"], ascending=[True, False, True])
    return {int(layer): sorted(int(e) for e in g.expert.head(count)) for layer, g in lift.groupby("layer")}


def topk_jaccard(scores: pd.DataFrame, k: int) -> pd.DataFrame:
    """Jaccard overlap of each domain pair's top-k expert sets per layer.

    `scores`: columns domain, layer, expert, score (higher = more important).
    Returns columns layer, domain_a, domain_b, jaccard.
    """
    ranked = scores.sort_values(["domain", "layer", "score", "expert"], ascending=[True, True, False, True])
    top = {(d, l): set(g.expert.head(k)) for (d, l), g in ranked.groupby(["domain", "layer"])}
    domains = sorted(scores.domain.unique())
    rows = []
    for layer in sorted(scores.layer.unique()):
        for a, b in itertools.combinations(domains, 2):
            sa, sb = top.get((a, layer), set()), top.get((b, layer), set())
            union = sa | sb
            rows.append({"layer": layer, "domain_a": a, "domain_b": b, "jaccard": len(sa & sb) / len(union) if union else 0.0})
    return pd.DataFrame(rows)


def random_jaccard(num_experts: int, k: int) -> float:
    """Expected Jaccard overlap of two independent uniformly random k-subsets of E experts."""
    from math import comb

    total = comb(num_experts, k)
    expected = 0.0
    for i in range(max(0, 2 * k - num_experts), k + 1):
        p = comb(k, i) * comb(num_experts - k, k - i) / total
        expected += p * i / (2 * k - i)
    return expected
