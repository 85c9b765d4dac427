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


def _cube(frame: pd.DataFrame, column: str, fill: float = 0.0) -> tuple[list[str], list[int], np.ndarray]:
    """`column` as an array (domain, layer, expert), with the sorted domain names and layers."""
    d, domains = pd.factorize(frame.domain, sort=True)  # fast on categoricals: works on the codes
    l, layers = pd.factorize(frame.layer, sort=True)
    e = frame.expert.to_numpy()
    cube = np.full((len(domains), len(layers), int(e.max()) + 1), fill, dtype=float)
    cube[d, l, e] = frame[column].to_numpy(dtype=float)
    return [str(x) for x in domains], [int(x) for x in layers], cube


def mutual_information(stats: pd.DataFrame) -> pd.Series:
    """I(domain; expert) in nats per layer, domains weighted equally.

    p(e | d) is the domain's routed share; p(d) = 1/|D|; p(e) = mean_d p(e | d).
    """
    domains, layers, counts = _cube(stats, "routed_tokens")
    totals = counts.sum(axis=-1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)  # (domain, layer, expert)
    marginal = shares.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(shares > 0, shares * np.log(shares / marginal), 0.0)
    return pd.Series(terms.sum(axis=(0, 2)) / len(domains), index=pd.Index(layers, name="layer"),
                     name="mutual_information")


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

    `scores`: columns domain, layer, expert, score (higher = more important;
    ties to the lower expert index). Returns columns layer, domain_a, domain_b, jaccard.
    """
    domains, layers, cube = _cube(scores, "score", fill=-np.inf)
    best = np.argsort(-cube, axis=-1, kind="stable")[..., :k]  # stable: equal scores keep the lower index first
    member = np.zeros(cube.shape, dtype=np.int32)
    np.put_along_axis(member, best, 1, axis=-1)
    inter = np.einsum("ale,ble->abl", member, member)
    sizes = member.sum(axis=-1)
    rows = []
    for a, b in itertools.combinations(range(len(domains)), 2):
        union = sizes[a] + sizes[b] - inter[a, b]
        values = np.where(union > 0, inter[a, b] / np.maximum(union, 1), 0.0)
        rows.extend({"layer": layers[i], "domain_a": domains[a], "domain_b": domains[b], "jaccard": float(v)}
                    for i, v in enumerate(values))
    return pd.DataFrame(rows).sort_values(["layer", "domain_a", "domain_b"], kind="stable").reset_index(drop=True)


def random_jaccard(num_experts: int, k: int) -> float:
    """Expected Jaccard overlap of two independent uniformly random k-subsets of E experts."""
    from math import comb

    total = comb(num_experts, k)
    expected = 0.0
    for i in range(max(0, 2 * k - num_experts), k + 1):
        p = comb(k, i) * comb(num_experts - k, k - i) / total
        expected += p * i / (2 * k - i)
    return expected
