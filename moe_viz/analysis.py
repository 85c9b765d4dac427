"""Tables behind the dashboard's views, computed from stored statistics (formulas: docs/METRICS.md).

`stats` arguments are `store.expert_stats` rows (columns domain, run_id,
layer, expert, ...); `layers` are `store.layer_stats` rows.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from . import criteria


def _per_layer_tokens(stats: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    return stats.merge(layers[["run_id", "layer", "tokens", "top_k"]], on=["run_id", "layer"], how="left")


def _safe_div(a: pd.Series, b: pd.Series) -> pd.Series:
    return (a / b.where(b > 0)).fillna(0.0)


# name -> (label with unit, function(stats with tokens/top_k columns) -> values)
STATISTICS = {
    "frequency_share": ("routed-token share (fraction of the layer's k·T slots)",
                        lambda s: _safe_div(s.routed_tokens, s.top_k * s.tokens)),
    "top1_share": ("top-1 share (fraction of tokens)", lambda s: _safe_div(s.top1_tokens, s.tokens)),
    "soft_count_mean": ("mean router score per token", lambda s: _safe_div(s.prob_sum, s.tokens)),
    "gate_mass_mean": ("mean applied gate weight per token", lambda s: _safe_div(s.gate_sum, s.tokens)),
    "ean_max": ("max ‖f_e(x)‖ over routed tokens", lambda s: s.ean_max),
}
METRICS = {**{k: v[0] for k, v in STATISTICS.items()},
           **{k: f"criterion: {v[0]}" for k, v in criteria.CRITERIA.items() if k != "random"}}


def metric_values(stats: pd.DataFrame, layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Columns domain, layer, expert, value for a statistic or a criterion."""
    if metric in STATISTICS:
        merged = _per_layer_tokens(stats, layers)
        return merged[["domain", "layer", "expert"]].assign(value=STATISTICS[metric][1](merged).to_numpy())
    frames = []
    for (domain, run_id), group in stats.groupby(["domain", "run_id"], sort=False):
        scored = criteria.score(group, metric)
        frames.append(scored[["layer", "expert"]].assign(domain=domain, value=scored.score.to_numpy()))
    return pd.concat(frames, ignore_index=True)[["domain", "layer", "expert", "value"]]


def metric_matrix(values: pd.DataFrame, domain: str) -> pd.DataFrame:
    """One domain's values as a layer x expert matrix."""
    return values[values.domain == domain].pivot(index="layer", columns="expert", values="value")


def router_health(stats: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """Per (domain, layer): load imbalance (max/mean routed share), router entropy, experts never routed."""
    merged = _per_layer_tokens(stats, layers)
    merged["share"] = STATISTICS["frequency_share"][1](merged)
    out = merged.groupby(["domain", "run_id", "layer"], as_index=False).agg(
        max_share=("share", "max"), mean_share=("share", "mean"),
        never_routed=("routed_tokens", lambda r: int((r == 0).sum())), num_experts=("expert", "count"))
    out["load_imbalance"] = _safe_div(out.max_share, out.mean_share)
    out = out.merge(layers[["run_id", "layer", "entropy_mean"]], on=["run_id", "layer"])
    out["entropy_normalised"] = out.entropy_mean / out.num_experts.map(lambda e: math.log(e) if e > 1 else 1.0)
    return out[["domain", "layer", "load_imbalance", "entropy_mean", "entropy_normalised", "never_routed", "num_experts"]]


def criteria_agreement(stats: pd.DataFrame, names: list[str], k: int) -> pd.DataFrame:
    """Per layer and criteria pair: Spearman rank correlation and top-k overlap |A∩B|/k (one domain)."""
    scored = {n: criteria.rank(criteria.score(stats, n)).set_index(["layer", "expert"])["rank"] for n in names}
    rows = []
    for layer in sorted(stats.layer.unique()):
        ranks = {n: s.xs(layer, level="layer") for n, s in scored.items()}
        for a, b in itertools.combinations(names, 2):
            ra, rb = ranks[a].to_numpy(float), ranks[b].to_numpy(float)
            rho = float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else 1.0
            top_a, top_b = set(ranks[a][ranks[a] < k].index), set(ranks[b][ranks[b] < k].index)
            rows.append({"layer": layer, "criterion_a": a, "criterion_b": b, "spearman": rho,
                         "topk_overlap": len(top_a & top_b) / k})
    return pd.DataFrame(rows)


def expert_profile(stats: pd.DataFrame, layers: pd.DataFrame, layer: int, expert: int) -> pd.DataFrame:
    """One expert across domains: its statistics, and its rank (0 = best) under each criterion."""
    rows = []
    merged = _per_layer_tokens(stats[stats.layer == layer], layers)
    for domain, group in merged.groupby("domain"):
        row = group[group.expert == expert].iloc[0]
        entry = {"domain": domain, "routed_tokens": int(row.routed_tokens),
                 "frequency_share": float(STATISTICS["frequency_share"][1](row.to_frame().T).iloc[0])}
        for name in criteria.CRITERIA:
            if name == "random":
                continue
            ranked = criteria.rank(criteria.score(group, name)).set_index("expert")
            entry[f"score:{name}"] = float(ranked.loc[expert, "score"])
            entry[f"rank:{name}"] = int(ranked.loc[expert, "rank"])
        rows.append(entry)
    return pd.DataFrame(rows)


def coactivation_partners(pairs: pd.DataFrame, stats_row_routed: int, expert: int) -> pd.DataFrame:
    """Partners of `expert` from one run's co-activation rows: tokens together and P(partner | expert)."""
    mine = pairs[(pairs.expert_a == expert) | (pairs.expert_b == expert)]
    partner = np.where(mine.expert_a == expert, mine.expert_b, mine.expert_a)
    out = pd.DataFrame({"partner": partner, "tokens": mine.tokens.to_numpy()})
    out["p_given_expert"] = out.tokens / stats_row_routed if stats_row_routed else 0.0
    return out.sort_values(["tokens", "partner"], ascending=[False, True]).reset_index(drop=True)
