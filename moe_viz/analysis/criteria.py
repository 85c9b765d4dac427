"""Expert saliency criteria computed from stored statistics (formulas: docs/METRICS.md).

Every criterion maps the `expert_stats` rows of one run to a score per
(layer, expert); a higher score means "more important, keep". Ranking applies
one rule for all criteria: experts never routed on the calibration data come
last, then higher score first, then lower expert index first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from moe_viz.errors import MoeVizError


def group_keys(frame: pd.DataFrame) -> list[str]:
    """Rankings are per layer, and per run when a frame holds several runs."""
    return (["run_id"] if "run_id" in frame.columns else []) + ["layer"]


def _per_routed(numerator: pd.Series, stats: pd.DataFrame) -> pd.Series:
    routed = stats["routed_tokens"].astype(float)
    return (numerator / routed.where(routed > 0)).fillna(0.0)


def _nllb(stats: pd.DataFrame) -> pd.Series:
    tokens = stats.groupby(group_keys(stats), observed=True)["top1_tokens"].transform("sum").astype(float)
    share = (stats["top1_tokens"] / tokens.where(tokens > 0)).fillna(0.0)
    top1 = stats["top1_tokens"].astype(float)
    mean_top1_prob = (stats["top1_prob_sum"] / top1.where(top1 > 0)).fillna(0.0)
    return share * np.exp(mean_top1_prob)


def _random(stats: pd.DataFrame, seed: int) -> pd.Series:
    # Seeded per (layer, expert) so the baseline does not depend on the domain or row order.
    keys = stats["layer"].to_numpy(np.int64) * 1_000_003 + stats["expert"].to_numpy(np.int64)
    values = [np.random.default_rng([seed, int(k)]).random() for k in keys]
    return pd.Series(values, index=stats.index)


@dataclass(frozen=True)
class Criterion:
    description: str  # what it measures, and where it comes from
    columns: tuple[str, ...]  # expert_stats columns it reads (besides routed_tokens, which ranking needs)
    compute: Callable[[pd.DataFrame, int], pd.Series]


CRITERIA: dict[str, Criterion] = {
    "frequency": Criterion("routed tokens (how often the expert is in the top-k)", (),
                           lambda s, _: s["routed_tokens"].astype(float)),
    "soft_count": Criterion("router probability mass over all tokens (SEER-MoE)", ("prob_sum",),
                            lambda s, _: s["prob_sum"]),
    "gate_mass": Criterion("sum of applied gate weights, 'alpha' (Chen et al. 2022)", ("gate_sum",),
                           lambda s, _: s["gate_sum"]),
    "ean_mean": Criterion("mean activation norm ||f_e(x)|| over routed tokens (MC-Suite)", ("ean_sum",),
                          lambda s, _: _per_routed(s["ean_sum"], s)),
    "ean_sum": Criterion("summed activation norm over routed tokens (MC-Suite EAN)", ("ean_sum",),
                         lambda s, _: s["ean_sum"]),
    "weighted_ean": Criterion("sum of gate * ||f_e(x)|| over routed tokens", ("reap_sum",),
                              lambda s, _: s["reap_sum"]),
    "reap": Criterion("mean of gate * ||f_e(x)|| over routed tokens (REAP, Lasby et al. 2025)", ("reap_sum",),
                      lambda s, _: _per_routed(s["reap_sum"], s)),
    "nllb": Criterion("top-1 share * exp(mean top-1 probability) (Koishekenov et al. 2023)",
                      ("top1_tokens", "top1_prob_sum"), lambda s, _: _nllb(s)),
    "easy_ep": Criterion("gate * ||f_e(x)|| weighted by token shift 1 - cos(h, h + r) (EASY-EP)",
                         ("contribution_sum",), lambda s, _: s["contribution_sum"]),
    "reconstruction": Criterion("relative block-output error when the expert alone is dropped (causal; "
                                "measured by `moe-viz importance`, blank until then)", ("recon_error",),
                                lambda s, _: s["recon_error"].astype(float)),
    "random": Criterion("seeded uniform random baseline", (), _random),
}


def columns_for(names: list[str]) -> list[str]:
    """The expert_stats columns these criteria read."""
    return list(dict.fromkeys(["routed_tokens"] + [c for n in names for c in CRITERIA[n].columns]))


def measured(stats: pd.DataFrame, name: str) -> bool:
    """Whether every row has what the criterion reads (causal scores exist only once measured)."""
    return all(c in stats.columns and stats[c].notna().all() for c in CRITERIA[name].columns)


def check_criterion(name: str) -> None:
    if name not in CRITERIA:
        raise MoeVizError(f"unknown criterion {name!r}; choose one of: {', '.join(CRITERIA)}")


def score(stats: pd.DataFrame, criterion: str, seed: int = 0) -> pd.DataFrame:
    """Columns [domain, run_id,] layer, expert, routed (bool), score for expert_stats rows of one or more runs."""
    check_criterion(criterion)
    stats = stats.sort_values(group_keys(stats) + ["expert"]).reset_index(drop=True)
    values = CRITERIA[criterion].compute(stats, seed)
    out = stats[[c for c in ("domain", "run_id", "layer", "expert") if c in stats.columns]].copy()
    out["routed"] = (stats["routed_tokens"] > 0).to_numpy()
    out["score"] = values.astype(float).to_numpy()
    return out


def normalise_per_layer(scores: pd.DataFrame) -> pd.Series:
    """Each layer's scores divided by their sum (a share); all-zero layers stay 0."""
    total = scores.groupby("layer")["score"].transform("sum")
    return (scores["score"] / total.where(total != 0)).fillna(0.0)


def mixed_scores(per_domain: dict[str, pd.DataFrame], weights: dict[str, float]) -> pd.DataFrame:
    """Weighted mix of per-domain scores, each normalised per layer first.

    An expert counts as routed if any domain with positive weight routed it.
    A single domain is returned as is (its raw scores).
    """
    if len(per_domain) == 1:
        return next(iter(per_domain.values())).copy()
    frames = []
    for domain, scores in per_domain.items():
        frames.append(scores.assign(score=normalise_per_layer(scores) * weights[domain], domain=domain))
    both = pd.concat(frames)
    mixed = both.groupby(["layer", "expert"], as_index=False).agg(score=("score", "sum"), routed=("routed", "any"))
    return mixed[["layer", "expert", "routed", "score"]]


def rank(scores: pd.DataFrame) -> pd.DataFrame:
    """Add `rank` (0 = most important) within each layer (and run), by the one ranking rule."""
    keys = group_keys(scores)
    ordered = scores.sort_values(keys + ["routed", "score", "expert"], ascending=[True] * len(keys) + [False, False, True])
    ordered = ordered.assign(rank=ordered.groupby(keys, observed=True).cumcount())
    return ordered.sort_values(keys + ["expert"]).reset_index(drop=True)
