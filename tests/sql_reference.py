"""Independent expectations for the dashboard's numbers: plain DuckDB SQL on the store, formulas from docs/METRICS.md.

Nothing here imports moe_viz's analysis code, so a test that compares the two catches a
wrong formula, axis, total or layer join in either place.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

# metric name -> SQL expression over s (expert_stats) and l (layer_stats), one row per (run, layer, expert)
METRIC_SQL = {
    # statistics (docs/METRICS.md "Dashboard tables")
    "frequency_share": "coalesce(s.routed_tokens / nullif(l.top_k * l.tokens, 0), 0)",
    "top1_share": "coalesce(s.top1_tokens / nullif(l.tokens, 0), 0)",
    "soft_count_mean": "coalesce(s.prob_sum / nullif(l.tokens, 0), 0)",
    "gate_mass_mean": "coalesce(s.gate_sum / nullif(l.tokens, 0), 0)",
    "ean_max": "s.ean_max",
    # criteria (docs/METRICS.md "Criteria")
    "frequency": "s.routed_tokens::DOUBLE",
    "soft_count": "s.prob_sum",
    "gate_mass": "s.gate_sum",
    "ean_mean": "coalesce(s.ean_sum / nullif(s.routed_tokens, 0), 0)",
    "ean_sum": "s.ean_sum",
    "weighted_ean": "s.reap_sum",
    "reconstruction": "s.recon_error",
    "reap": "coalesce(s.reap_sum / nullif(s.routed_tokens, 0), 0)",
    "nllb": """coalesce(s.top1_tokens / nullif(sum(s.top1_tokens) OVER (PARTITION BY s.run_id, s.layer), 0), 0)
               * exp(coalesce(s.top1_prob_sum / nullif(s.top1_tokens, 0), 0))""",
    "easy_ep": "s.contribution_sum",
}


def sql(store_path, query: str, *params, **named) -> pd.DataFrame:
    with duckdb.connect(str(store_path), read_only=True) as con:
        return con.execute(query, named or list(params)).df()


def metric_table(store_path, metric: str, run_ids) -> pd.DataFrame:
    """Columns domain, run_id, layer, expert, routed, value for these runs."""
    return sql(store_path, f"""
        SELECT r.domain, s.run_id, s.layer, s.expert, s.routed_tokens > 0 AS routed, {METRIC_SQL[metric]} AS value
        FROM expert_stats s JOIN layer_stats l USING (run_id, layer) JOIN runs r USING (run_id)
        WHERE s.run_id IN (SELECT unnest(?)) ORDER BY r.domain, s.layer, s.expert""", list(run_ids))


def metric_matrix(store_path, metric: str, run_id: str) -> pd.DataFrame:
    """One run's metric as a layer x expert matrix (rows and columns sorted)."""
    return metric_table(store_path, metric, [run_id]).pivot(index="layer", columns="expert", values="value")


def ranks(table: pd.DataFrame) -> pd.DataFrame:
    """The ranking rule (docs/METRICS.md): never-routed last, then higher score, then lower index; 0 = best.

    `table`: columns layer, expert, routed, value (one run or one mix). Adds column `rank`.
    """
    out = []
    for _, group in table.groupby("layer", sort=True):
        order = sorted(group.itertuples(index=False), key=lambda r: (not r.routed, -r.value, r.expert))
        out.extend({**r._asdict(), "rank": i} for i, r in enumerate(order))
    return pd.DataFrame(out).sort_values(["layer", "expert"]).reset_index(drop=True)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two rank vectors."""
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def mixed_ranks(store_path, metric: str, run_ids: dict[str, str], weights: dict[str, float]) -> pd.DataFrame:
    """docs/METRICS.md domain mixes: each domain's scores as per-layer shares, weighted sum, routed if any domain
    routed the expert; a single domain keeps its raw scores. Columns layer, expert, routed, value, rank."""
    table = metric_table(store_path, metric, [run_ids[d] for d in weights])
    if len(weights) == 1:
        return ranks(table[["layer", "expert", "routed", "value"]])
    table["share"] = table.value / table.groupby(["domain", "layer"]).value.transform("sum")
    table["weighted"] = table.share * table.domain.map(weights)
    return ranks(table.groupby(["layer", "expert"], as_index=False).agg(value=("weighted", "sum"), routed=("routed", "any")))


def share_lost(store_path, run_ids, dropped: dict[int, list[int]]) -> pd.DataFrame:
    """Per (domain, layer): routed-token share and REAP share carried by the dropped experts (docs/METRICS.md preview)."""
    pairs = [(int(l), int(e)) for l, experts in dropped.items() for e in experts] or [(-1, -1)]
    values = ", ".join(f"({l}, {e})" for l, e in pairs)
    return sql(store_path, f"""
        WITH dropped(layer, expert) AS (VALUES {values})
        SELECT r.domain, s.layer,
               coalesce(sum(s.routed_tokens) FILTER (WHERE d.layer IS NOT NULL), 0) / sum(s.routed_tokens) AS routed_share_lost,
               coalesce(sum(s.reap_sum) FILTER (WHERE d.layer IS NOT NULL), 0) / sum(s.reap_sum) AS reap_share_lost
        FROM expert_stats s JOIN runs r USING (run_id) LEFT JOIN dropped d USING (layer, expert)
        WHERE s.run_id IN (SELECT unnest(?)) GROUP BY ALL ORDER BY ALL""", list(run_ids))


def router_health(store_path) -> pd.DataFrame:
    """Per (domain, layer): load imbalance = max share / mean share, entropy / ln E, never-routed count."""
    return sql(store_path, """SELECT r.domain, s.layer,
            max(s.routed_tokens / (l.top_k * l.tokens)) / avg(s.routed_tokens / (l.top_k * l.tokens)) AS imbalance,
            any_value(l.entropy_mean) / ln(any_value(l.num_experts)) AS entropy,
            count(*) FILTER (WHERE s.routed_tokens = 0) AS never
        FROM expert_stats s JOIN layer_stats l USING (run_id, layer) JOIN runs r USING (run_id) GROUP BY ALL""")


def partners(store_path, run_id: str, layer: int, expert: int) -> pd.DataFrame:
    """Co-activation partners of an expert: partner, tokens together, P(partner | expert); most tokens first."""
    return sql(store_path, """SELECT CASE WHEN c.expert_a = $expert THEN c.expert_b ELSE c.expert_a END AS partner,
            c.tokens, c.tokens / s.routed_tokens AS p
        FROM coactivation c JOIN expert_stats s ON s.run_id = c.run_id AND s.layer = c.layer AND s.expert = $expert
        WHERE c.run_id = $run AND c.layer = $layer AND (c.expert_a = $expert OR c.expert_b = $expert)
        ORDER BY c.tokens DESC, partner""", run=run_id, layer=int(layer), expert=int(expert))
