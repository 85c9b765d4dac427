"""What an expert does, token by token: views over a run's token-level trace (formulas: docs/METRICS.md).

A trace is a run's `token_routes` / `run_tokens` / `token_pieces` rows in the store, or the
same frames for a text traced on its own (`capture.trace.trace_text`). `TraceSource` hides the
difference: every view is one SQL query over tables of those names, filtered to one run id.

Notation (per run, one MoE layer l): T traced tokens, c(v) occurrences of token id v among
them, n_e tokens routed to expert e (any of the k slots), n_{v,e} occurrences of v routed
to e, g_{v,e} their summed gates.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import re

import duckdb
import numpy as np
import pandas as pd

from moe_viz import store
from moe_viz.errors import MoeVizError

TEXT_RUN = "text"  # run id given to the frames of a traced text


@dataclass(frozen=True)
class TraceSource:
    """A run's trace in the store (`store_path`, `run_id`), or frames of a traced text (`frames`)."""

    store_path: str | Path | None = None
    run_id: str = TEXT_RUN
    frames: dict[str, pd.DataFrame] | None = field(default=None, compare=False, hash=False)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.frames is None:
            with store.connect(self.store_path, read_only=True) as con:
                yield con
            return
        with duckdb.connect() as con:
            for name in store.TRACE_TABLES:
                con.register(f"{name}_frame", self.frames[name])
                con.execute(f"CREATE VIEW {name} AS SELECT '{TEXT_RUN}' AS run_id, * FROM {name}_frame")
            yield con

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        """`sql` with `$run` bound to this run id and `params` to $1, $2, ..."""
        return self.queries((sql, params))[0]

    def queries(self, *statements: tuple[str, list | None]) -> list[pd.DataFrame]:
        """Several (sql, params) on one connection (opening a big store costs more than a small query)."""
        with self.connect() as con:
            return [con.execute(*bind(sql, self.run_id, params)).df() for sql, params in statements]


def bind(sql: str, run_id: str, params: list | None = None) -> tuple[str, dict]:
    """`$run` and `$1`, `$2`, ... as DuckDB named parameters (only those the query uses)."""
    sql = re.sub(r"\$(\d+)", r"$p\1", re.sub(r"\$run\b", "$run_id", sql))
    values = {"run_id": run_id, **{f"p{i + 1}": p for i, p in enumerate(params or [])}}
    return sql, {name: value for name, value in values.items() if re.search(rf"\${name}\b", sql)}


def has_trace(source: TraceSource) -> bool:
    return int(source.query("SELECT count(*) AS n FROM run_tokens WHERE run_id = $run").n[0]) > 0


def require_trace(source: TraceSource, domain: str) -> None:
    if not has_trace(source):
        raise MoeVizError(f"run of {domain} has no token trace: capture it again with `--trace-tokens N` (N > 0)")


# -- expert profiles -------------------------------------------------------------------

def expert_tokens(source: TraceSource, layer: int, expert: int) -> tuple[pd.DataFrame, dict]:
    """Every token id routed to (layer, expert), and the expert's summary.

    Rows: token_id, piece, count n_{v,e}, gate_mass g_{v,e}, mean_gate, occurrences c(v),
    share_here n_{v,e}/c(v), lift (n_{v,e}/c(v)) / (n_e/T). Summary: traced_tokens T,
    routed n_e, expert_share n_e/T, distinct_tokens (ids with n_{v,e} > 0), domain_distinct
    (ids with c(v) > 0), coverage = distinct_tokens / domain_distinct.
    """
    rows, totals = source.queries(("""
        WITH here AS (SELECT token_id, count(*) AS count, sum(gate::DOUBLE) AS gate_mass FROM token_routes
                      WHERE run_id = $run AND layer = $1 AND expert = $2 GROUP BY token_id),
             occ AS (SELECT token_id, count(*) AS occurrences FROM run_tokens WHERE run_id = $run GROUP BY token_id)
        SELECT h.token_id, coalesce(p.piece, '[' || h.token_id || ']') AS piece, h.count, h.gate_mass,
               o.occurrences
        FROM here h JOIN occ o USING (token_id)
        LEFT JOIN (SELECT token_id, piece FROM token_pieces WHERE run_id = $run) p USING (token_id)
        ORDER BY h.count DESC, h.gate_mass DESC, h.token_id""", [int(layer), int(expert)]),
        ("SELECT count(*) AS t, count(DISTINCT token_id) AS v FROM run_tokens WHERE run_id = $run", None))
    traced, domain_distinct = int(totals.t[0]), int(totals.v[0])
    routed = int(rows["count"].sum())
    share = routed / traced if traced else 0.0
    rows["mean_gate"] = rows.gate_mass / rows["count"]
    rows["share_here"] = rows["count"] / rows.occurrences
    rows["lift"] = rows.share_here / share if share else np.nan
    summary = {"traced_tokens": traced, "routed": routed, "expert_share": share,
               "distinct_tokens": len(rows), "domain_distinct": domain_distinct,
               "coverage": len(rows) / domain_distinct if domain_distinct else 0.0}
    return rows[["token_id", "piece", "count", "gate_mass", "mean_gate", "occurrences", "share_here", "lift"]], summary


def top_by_count(tokens: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """Most frequent token ids on the expert (ties: larger gate mass, then smaller id)."""
    return tokens.sort_values(["count", "gate_mass", "token_id"], ascending=[False, False, True]).head(n)


def top_by_gate_mass(tokens: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """Token ids carrying the most gate mass on the expert (ties: larger count, then smaller id)."""
    return tokens.sort_values(["gate_mass", "count", "token_id"], ascending=[False, False, True]).head(n)


def example_contexts(source: TraceSource, layer: int, expert: int, token_id: int | None = None,
                     limit: int = 5, width: int = 8) -> pd.DataFrame:
    """Occurrences routed to (layer, expert) with the largest gates, each inside ±`width` tokens of its sequence.

    Rows: seq, pos, token_id, gate, before, piece, after (texts joined from the tokens' pieces).
    """
    picked, around = source.queries(("""
        SELECT seq, pos, token_id, gate FROM token_routes
        WHERE run_id = $run AND layer = $1 AND expert = $2 AND ($3 IS NULL OR token_id = $3)
        ORDER BY gate DESC, seq, pos LIMIT $4""", [int(layer), int(expert), token_id, int(limit)]), ("""
        WITH picked AS (SELECT seq, pos FROM token_routes
                        WHERE run_id = $run AND layer = $1 AND expert = $2 AND ($3 IS NULL OR token_id = $3)
                        ORDER BY gate DESC, seq, pos LIMIT $4)
        SELECT t.seq, t.pos, coalesce(p.piece, '[' || t.token_id || ']') AS piece FROM run_tokens t
        LEFT JOIN (SELECT token_id, piece FROM token_pieces WHERE run_id = $run) p USING (token_id)
        WHERE t.run_id = $run AND EXISTS (SELECT 1 FROM picked k WHERE k.seq = t.seq AND t.pos BETWEEN k.pos - $5 AND k.pos + $5)
        ORDER BY t.seq, t.pos""", [int(layer), int(expert), token_id, int(limit), int(width)]))
    if picked.empty:
        return picked.assign(before="", piece="", after="")
    text = {key: piece for key, piece in zip(zip(around.seq, around.pos), around.piece)}

    def join(seq: int, positions) -> str:
        return "".join(text.get((seq, p), "") for p in positions)

    picked["before"] = [join(s, range(max(0, p - width), p)) for s, p in zip(picked.seq, picked.pos)]
    picked["piece"] = [text.get((s, p), "") for s, p in zip(picked.seq, picked.pos)]
    picked["after"] = [join(s, range(p + 1, p + width + 1)) for s, p in zip(picked.seq, picked.pos)]
    return picked


def domain_differences(source_a: TraceSource, source_b: TraceSource, layer: int, top: int = 8) -> pd.DataFrame:
    """Per expert of `layer` routed in both traces (runs of one store): total variation distance between its
    token distributions.

    TV_e = ½ Σ_v |n^A_{v,e}/n^A_e − n^B_{v,e}/n^B_e|; rows sorted by TV (largest first, ties by expert) with each
    side's `top` token pieces by count (ties: smaller id). Columns: expert, routed_a, routed_b, tv, top_a, top_b.
    """
    if source_a.frames is not None or source_b.frames is not None or source_a.store_path != source_b.store_path:
        raise MoeVizError("domain differences compare two runs of one store")
    return source_a.query("""
        WITH counts AS (
            SELECT (run_id = $run) AS is_a, expert, token_id, count(*) AS n FROM token_routes
            WHERE (run_id = $run OR run_id = $1) AND layer = $2 GROUP BY ALL),
        totals AS (SELECT is_a, expert, sum(n) AS routed FROM counts GROUP BY ALL),
        both_sides AS (SELECT expert FROM totals GROUP BY expert HAVING count(*) = 2),
        dist AS (
            SELECT c.expert, c.token_id,
                   sum(CASE WHEN c.is_a THEN c.n / t.routed ELSE -c.n / t.routed END) AS diff
            FROM counts c JOIN totals t USING (is_a, expert) WHERE c.expert IN (SELECT expert FROM both_sides)
            GROUP BY ALL),
        tv AS (SELECT expert, 0.5 * sum(abs(diff)) AS tv FROM dist GROUP BY expert),
        ranked AS (
            SELECT c.is_a, c.expert, c.n, coalesce(p.piece, '[' || c.token_id || ']') AS piece,
                   row_number() OVER (PARTITION BY c.is_a, c.expert ORDER BY c.n DESC, c.token_id) AS r
            FROM counts c LEFT JOIN (SELECT DISTINCT token_id, piece FROM token_pieces
                                     WHERE run_id = $run OR run_id = $1) p USING (token_id)
            WHERE c.expert IN (SELECT expert FROM both_sides)),
        lists AS (
            SELECT is_a, expert, string_agg(format('“{}”×{}', replace(piece, chr(10), '⏎'), n), ' · ' ORDER BY r) AS top
            FROM ranked WHERE r <= $3 GROUP BY ALL)
        SELECT tv.expert::INTEGER AS expert, ta.routed::BIGINT AS routed_a, tb.routed::BIGINT AS routed_b, tv.tv,
               la.top AS top_a, lb.top AS top_b
        FROM tv JOIN totals ta ON ta.expert = tv.expert AND ta.is_a JOIN totals tb ON tb.expert = tv.expert AND NOT tb.is_a
        JOIN lists la ON la.expert = tv.expert AND la.is_a JOIN lists lb ON lb.expert = tv.expert AND NOT lb.is_a
        ORDER BY tv.tv DESC, tv.expert""", [source_b.run_id, int(layer), int(top)])


# -- token routes ------------------------------------------------------------------------

def trace_sequences(source: TraceSource) -> pd.DataFrame:
    """Traced sequences: seq, tokens."""
    return source.query("SELECT seq, count(*) AS tokens FROM run_tokens WHERE run_id = $run GROUP BY seq ORDER BY seq")


def token_window(source: TraceSource, seq: int, start: int, length: int) -> pd.DataFrame:
    """Routes of positions [start, start+length) of one sequence, with pieces.

    Rows: seq, pos, token_id, piece, layer, slot, expert, gate, gate_rank, ordered by (pos, layer, slot).
    """
    return source.query("""
        SELECT r.seq, r.pos, r.token_id, coalesce(p.piece, '[' || r.token_id || ']') AS piece, r.layer, r.slot,
               r.expert, r.gate, r.gate_rank
        FROM token_routes r LEFT JOIN (SELECT token_id, piece FROM token_pieces WHERE run_id = $run) p USING (token_id)
        WHERE r.run_id = $run AND r.seq = $1 AND r.pos >= $2 AND r.pos < $2 + $3
        ORDER BY r.pos, r.layer, r.slot""", [int(seq), int(start), int(length)])


def _dropped_pairs(kept: dict[int, list[int]], num_experts: dict[int, int]) -> pd.DataFrame:
    rows = [(int(layer), e) for layer, keep in kept.items() for e in sorted(set(range(num_experts[layer])) - set(keep))]
    return pd.DataFrame(rows, columns=["layer", "expert"]).astype({"layer": "int16", "expert": "int16"})


def gate_removed(window: pd.DataFrame, kept: dict[int, list[int]], num_experts: dict[int, int]) -> pd.DataFrame:
    """Per (pos, layer) of a window: removed = Σ gates of dropped experts, total = Σ gates, removed_fraction.

    Layers the plan does not cover keep everything.
    """
    dropped = _dropped_pairs(kept, num_experts)
    marked = window.merge(dropped.assign(dropped=True), on=["layer", "expert"], how="left")
    marked["removed"] = np.where(marked.dropped.fillna(False).astype(bool), marked.gate.astype(np.float64), 0.0)
    marked["total"] = marked.gate.astype(np.float64)
    out = marked.groupby(["seq", "pos", "layer"], as_index=False)[["removed", "total"]].sum()
    out["removed_fraction"] = np.where(out.total > 0, out.removed / out.total.where(out.total > 0, 1.0), 0.0)
    return out


def tokens_hurt(source: TraceSource, kept: dict[int, list[int]], num_experts: dict[int, int],
                top: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which traced tokens a plan hurts: hurt = the share of the token's applied gate mass, summed over all
    MoE layers, that sits on experts the plan drops (one aggregation per token: ~4x cheaper than a mean of
    per-layer fractions on 94-layer traces, and equal to it whenever every layer's gates sum alike).

    Returns (occurrences: seq, pos, token_id, piece, hurt — the `top` largest, ties by (seq, pos);
    token ids: token_id, piece, occurrences, mean_hurt — the `top` largest means over their
    occurrences, ties by more occurrences, then smaller id).
    """
    dropped = _dropped_pairs(kept, num_experts)
    hurt, pieces = source.queries(("""
        SELECT r.seq, r.pos, any_value(r.token_id) AS token_id,
               coalesce(sum(r.gate::DOUBLE) FILTER (WHERE d.expert IS NOT NULL) / nullif(sum(r.gate::DOUBLE), 0), 0)
                   AS hurt
        FROM token_routes r LEFT JOIN (SELECT unnest($1::SMALLINT[]) AS layer, unnest($2::SMALLINT[]) AS expert) d
             ON d.layer = r.layer AND d.expert = r.expert
        WHERE r.run_id = $run GROUP BY r.seq, r.pos""", [dropped.layer.tolist(), dropped.expert.tolist()]),
        ("SELECT token_id, piece FROM token_pieces WHERE run_id = $run", None))
    hurt = hurt.merge(pieces, on="token_id", how="left")
    hurt["piece"] = hurt.piece.fillna("[" + hurt.token_id.astype(str) + "]")
    occurrences = hurt.sort_values(["hurt", "seq", "pos"], ascending=[False, True, True]).head(top)
    by_id = hurt.groupby(["token_id", "piece"], as_index=False).agg(occurrences=("hurt", "size"),
                                                                    mean_hurt=("hurt", "mean"))
    by_id = by_id.sort_values(["mean_hurt", "occurrences", "token_id"], ascending=[False, False, True]).head(top)
    return (occurrences[["seq", "pos", "token_id", "piece", "hurt"]].reset_index(drop=True),
            by_id[["token_id", "piece", "occurrences", "mean_hurt"]].reset_index(drop=True))


def context_dependence(source: TraceSource) -> pd.DataFrame:
    """Per layer, over token ids with c(v) ≥ 2: how many distinct top-1 experts one id is routed to.

    Columns: layer, token_ids (ids with c(v) ≥ 2), mean_distinct_top1 (mean over those ids of the number
    of distinct top-1 experts across the id's occurrences), same_top1_share (share of those ids whose
    occurrences all have the same top-1 expert).
    """
    return source.query("""
        WITH pairs AS (SELECT layer, token_id, expert, count(*) AS n FROM token_routes
                       WHERE run_id = $run AND gate_rank = 0 GROUP BY ALL),
             per_id AS (SELECT layer, token_id, count(*) AS top1, sum(n) AS occurrences FROM pairs GROUP BY ALL)
        SELECT layer::INTEGER AS layer, count(*) AS token_ids, avg(top1) AS mean_distinct_top1,
               avg((top1 = 1)::INTEGER) AS same_top1_share
        FROM per_id WHERE occurrences >= 2 GROUP BY layer ORDER BY layer""")


def context_dependent_tokens(source: TraceSource, layer: int, top: int = 20) -> pd.DataFrame:
    """Token ids of one layer with the most distinct top-1 experts (ties: more occurrences, smaller id)."""
    return source.query("""
        SELECT r.token_id, coalesce(any_value(p.piece), '[' || r.token_id || ']') AS piece,
               count(*) FILTER (WHERE r.gate_rank = 0) AS occurrences,
               count(DISTINCT r.expert) FILTER (WHERE r.gate_rank = 0) AS distinct_top1,
               count(DISTINCT r.expert) AS distinct_routed
        FROM token_routes r LEFT JOIN (SELECT token_id, piece FROM token_pieces WHERE run_id = $run) p USING (token_id)
        WHERE r.run_id = $run AND r.layer = $1 GROUP BY r.token_id HAVING occurrences >= 2
        ORDER BY distinct_top1 DESC, occurrences DESC, r.token_id LIMIT $2""", [int(layer), int(top)])
