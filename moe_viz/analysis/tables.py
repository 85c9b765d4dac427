"""Tables behind the dashboard's views, computed from stored statistics (formulas: docs/METRICS.md).

`stats` arguments are `store.expert_stats` rows (columns domain, run_id,
layer, expert, ...); `layers` are `store.layer_stats` rows.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd

from moe_viz.analysis import criteria


def _per_layer_tokens(stats: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    return stats.merge(layers[["run_id", "layer", "tokens", "top_k"]], on=["run_id", "layer"], how="left")


def _safe_div(a: pd.Series, b: pd.Series) -> pd.Series:
    return (a / b.where(b > 0)).fillna(0.0)


# name -> (label with unit, expert_stats column it reads, function(stats with tokens/top_k columns) -> values)
STATISTICS = {
    "frequency_share": ("routed-token share (fraction of the layer's k·T slots)", "routed_tokens",
                        lambda s: _safe_div(s.routed_tokens, s.top_k * s.tokens)),
    "top1_share": ("top-1 share (fraction of tokens)", "top1_tokens", lambda s: _safe_div(s.top1_tokens, s.tokens)),
    "soft_count_mean": ("mean router score per token", "prob_sum", lambda s: _safe_div(s.prob_sum, s.tokens)),
    "gate_mass_mean": ("mean applied gate weight per token", "gate_sum", lambda s: _safe_div(s.gate_sum, s.tokens)),
    "ean_max": ("max ‖f_e(x)‖ over routed tokens", "ean_max", lambda s: s.ean_max),
}
METRICS = {**{k: v[0] for k, v in STATISTICS.items()},
           **{k: f"criterion: {v.description}" for k, v in criteria.CRITERIA.items() if k != "random"}}


def metric_columns(metric: str) -> list[str]:
    """The expert_stats columns a statistic or criterion reads (so views query only those)."""
    if metric in STATISTICS:
        return list(dict.fromkeys(["routed_tokens", STATISTICS[metric][1]]))
    return criteria.columns_for([metric])


def metric_values(stats: pd.DataFrame, layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Columns domain, layer, expert, value for a statistic or a criterion."""
    if metric in STATISTICS:
        merged = _per_layer_tokens(stats, layers)
        return merged[["domain", "layer", "expert"]].assign(value=STATISTICS[metric][2](merged).to_numpy())
    scored = criteria.score(stats, metric)
    return scored[["domain", "layer", "expert"]].assign(value=scored.score.to_numpy())


def metric_matrix(values: pd.DataFrame, domain: str) -> pd.DataFrame:
    """One domain's values as a layer x expert matrix."""
    return values[values.domain == domain].pivot(index="layer", columns="expert", values="value")


def router_health(stats: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """Per (domain, layer): load imbalance (max/mean routed share), router entropy, experts never routed."""
    merged = _per_layer_tokens(stats, layers)
    merged["share"] = STATISTICS["frequency_share"][2](merged)
    out = merged.groupby(["domain", "run_id", "layer"], as_index=False).agg(
        max_share=("share", "max"), mean_share=("share", "mean"),
        never_routed=("routed_tokens", lambda r: int((r == 0).sum())), num_experts=("expert", "count"))
    out["load_imbalance"] = _safe_div(out.max_share, out.mean_share)
    out = out.merge(layers[["run_id", "layer", "entropy_mean"]], on=["run_id", "layer"])
    out["entropy_normalised"] = out.entropy_mean / out.num_experts.map(lambda e: math.log(e) if e > 1 else 1.0)
    return out[["domain", "layer", "load_imbalance", "entropy_mean", "entropy_normalised", "never_routed", "num_experts"]]


def _rank_cube(stats: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, list[int]]:
    """Ranks of one run as an array (criterion, layer, expert)."""
    cube = []
    for name in names:
        ranked = criteria.rank(criteria.score(stats, name))
        cube.append(ranked.pivot(index="layer", columns="expert", values="rank").to_numpy(float))
    layers = sorted(int(l) for l in stats.layer.unique())
    return np.stack(cube), layers


def criteria_agreement(stats: pd.DataFrame, names: list[str], k: int) -> pd.DataFrame:
    """Per layer and criteria pair: Spearman rank correlation and top-k overlap |A∩B|/k (one run).

    Ranks are permutations of 0..E-1, so Spearman's ρ is the Pearson correlation of the ranks.
    """
    ranks, layers = _rank_cube(stats, names)
    centred = ranks - ranks.mean(axis=-1, keepdims=True)
    z = centred / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True))
    rho = np.clip(np.einsum("ale,ble->abl", z, z) / ranks.shape[-1], -1.0, 1.0)
    top = (ranks < k).astype(float)
    overlap = np.einsum("ale,ble->abl", top, top) / k
    rows = []
    for a, b in itertools.combinations(range(len(names)), 2):
        for i, layer in enumerate(layers):
            rows.append({"layer": layer, "criterion_a": names[a], "criterion_b": names[b],
                         "spearman": float(rho[a, b, i]), "topk_overlap": float(overlap[a, b, i])})
    return pd.DataFrame(rows).sort_values(["layer", "criterion_a", "criterion_b"], kind="stable").reset_index(drop=True)


def expert_profile(stats: pd.DataFrame, layers: pd.DataFrame, layer: int, expert: int) -> pd.DataFrame:
    """One expert across domains: its statistics, and its rank (0 = best) under each criterion."""
    in_layer = stats[stats.layer == layer]
    merged = _per_layer_tokens(in_layer, layers)
    mine = merged[merged.expert == expert].set_index("run_id")
    profile = pd.DataFrame({
        "domain": mine.domain.astype(str).to_numpy(),
        "routed_tokens": mine.routed_tokens.astype(int).to_numpy(),
        "frequency_share": STATISTICS["frequency_share"][2](mine).to_numpy(),
    }, index=mine.index)
    for name in criteria.CRITERIA:
        if name == "random" or not criteria.measured(in_layer, name):
            continue
        ranked = criteria.rank(criteria.score(in_layer, name))
        row = ranked[ranked.expert == expert].set_index("run_id")
        profile[f"score:{name}"] = row.score
        profile[f"rank:{name}"] = row["rank"].astype(int)
    return profile.sort_values("domain").reset_index(drop=True)


def coactivation_partners(pairs: pd.DataFrame, stats_row_routed: int, expert: int) -> pd.DataFrame:
    """Partners of `expert` from one run's co-activation rows: tokens together and P(partner | expert)."""
    mine = pairs[(pairs.expert_a == expert) | (pairs.expert_b == expert)]
    partner = np.where(mine.expert_a == expert, mine.expert_b, mine.expert_a)
    out = pd.DataFrame({"partner": partner, "tokens": mine.tokens.to_numpy()})
    out["p_given_expert"] = out.tokens / stats_row_routed if stats_row_routed else 0.0
    return out.sort_values(["tokens", "partner"], ascending=[False, True]).reset_index(drop=True)


def layer_labels(layers: pd.DataFrame) -> dict[int, str]:
    """How pickers name each MoE layer number (`layer_stats` rows): the number alone, or, when the blocks
    sit in more than one stack of layers (encoder-decoder) or a number is not its decoder layer's index
    (JetMoE: two blocks per decoder layer), the number and the block's module path,
    e.g. "2 · decoder.block.0.layer.2.mlp" (numbers: docs/STORE.md)."""
    modules = {int(layer): str(module) for layer, module in zip(layers.layer, layers.module)}
    stacks = {re.split(r"\.\d+(?:\.|$)", module, maxsplit=1)[0] for module in modules.values()}
    indices = {layer: re.search(r"\.(\d+)(?:\.|$)", module) for layer, module in modules.items()}
    if len(stacks) <= 1 and all(found is None or int(found[1]) == layer for layer, found in indices.items()):
        return {layer: str(layer) for layer in modules}
    return {layer: f"{layer} · {module}" for layer, module in modules.items()}
