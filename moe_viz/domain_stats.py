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
    cube = shares.pivot_table(index="layer", columns=["domain", "expert"], values="share", observed=True).fillna(0.0)
    layers = cube.index
    domains = cube.columns.get_level_values(0).unique()
    table = cube.to_numpy().reshape(len(layers), len(domains), -1)  # (layer, domain, expert)
    marginal = table.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(table > 0, table * np.log(table / marginal), 0.0)
    return pd.Series(terms.sum(axis=(1, 2)) / len(domains), index=layers, name="mutual_information")


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
    domain_codes = pd.Categorical(scores.domain.astype(str) if scores.domain.dtype == object else scores.domain)
    domains = sorted(str(d) for d in domain_codes.categories)
    domain_codes = domain_codes.rename_categories([str(d) for d in domain_codes.categories]).reorder_categories(domains)
    layer_values = scores.layer.to_numpy()
    layers = sorted(int(l) for l in np.unique(layer_values))
    experts = int(scores.expert.max()) + 1
    d = np.asarray(domain_codes.codes)
    l = np.searchsorted(layers, layer_values)
    e = scores.expert.to_numpy()
    order = np.lexsort((e, -scores.score.to_numpy(), l, d))  # per (domain, layer): best score, then lower index
    d, l, e = d[order], l[order], e[order]
    group = d * len(layers) + l
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    position = np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    keep = position < k
    member = np.zeros((len(domains), len(layers), experts), dtype=np.int32)
    member[d[keep], l[keep], e[keep]] = 1
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
