"""Comparing pruning plans: the tables behind the dashboard's Compare plans page (no Streamlit here).

- `evaluation_groups` / `curves`: quality vs sparsity per criterion from stored plan evaluations
  (`sweep.stored_sweeps`). A sweep stores one row per distinct plan, so a criterion that keeps
  the same experts as another at some sparsity has no row of its own there; `curves` rebuilds
  that criterion's plan (`plan.build_plan`, statistics only) and shows the shared numbers,
  naming the criterion they were stored under.
- `cut_tradeoff`: for each criterion, as sparsity grows, the share of routed tokens and of REAP
  saliency mass the dropped experts carried (`plan.preview`) — from stored statistics, no forward pass.
- `results_table`: plan evaluations as a readable table (both pages use it).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from moe_viz.errors import MoeVizError
from moe_viz.prune.plan import build_plan, preview
from moe_viz.prune.sweep import plan_key

GROUP_COLUMNS = ["domains", "scope", "seed", "plan_top_k"]
METRICS = ("kl", "nll_delta", "top1_agreement")


def mix_label(domains: dict[str, float] | str) -> str:
    """{"code": 1, "prose": 0.5} (or its JSON) -> 'code:1 + prose:0.5'."""
    mix = json.loads(domains) if isinstance(domains, str) else domains
    return " + ".join(f"{name}:{weight:g}" for name, weight in sorted(mix.items()))


def evaluation_groups(evals: pd.DataFrame) -> pd.DataFrame:
    """Distinct (calibration mix, scope, seed, top-k) settings of a model's stored evaluations, newest first,
    with how many plans each holds and a label."""
    groups = evals.groupby(GROUP_COLUMNS, as_index=False).agg(
        plans=("plan_key", "nunique"), criteria=("criterion", "nunique"), newest=("created_at", "max"))
    groups = groups.sort_values(["newest", "plans"], ascending=False).reset_index(drop=True)
    groups["label"] = [
        f"{mix_label(g.domains)} · {g.scope} · seed {g.seed}" + (f" · top-k {g.plan_top_k}" if g.plan_top_k >= 0 else "")
        + f" ({g.plans} plan{'s' if g.plans != 1 else ''} stored)" for g in groups.itertuples()]
    return groups


def _in_group(evals: pd.DataFrame, group: dict) -> pd.Series:
    return np.logical_and.reduce([evals[c] == group[c] for c in GROUP_COLUMNS])


def group_rows(evals: pd.DataFrame, group: dict) -> pd.DataFrame:
    """The stored evaluations of one setting (a row of `evaluation_groups`)."""
    return evals[_in_group(evals, group)]


def panel_sets(evals: pd.DataFrame, group: dict) -> dict[str, str]:
    """Per evaluation domain of a group, the evaluation set its curves use: the one most of the group's
    plans were evaluated on (a sweep evaluates all its plans on the same tokens), newest on a tie."""
    rows = group_rows(evals, group)
    counts = rows.groupby(["eval_domain", "eval_set"], as_index=False).agg(n=("plan_key", "nunique"),
                                                                           newest=("created_at", "max"))
    counts = counts.sort_values(["eval_domain", "n", "newest"], ascending=[True, False, False])
    return dict(counts.drop_duplicates("eval_domain")[["eval_domain", "eval_set"]].itertuples(index=False))


def on_panel_sets(evals: pd.DataFrame, group: dict) -> pd.DataFrame:
    """Every stored evaluation (of any setting) on the evaluation sets a group's curves use."""
    sets = panel_sets(evals, group)
    return evals[[sets.get(d) == s for d, s in zip(evals.eval_domain, evals.eval_set)]]


def missing_points(evals: pd.DataFrame, group: dict, criteria: list[str]) -> list[tuple[str, float]]:
    """(criterion, sparsity) pairs of a group without a row stored under that criterion."""
    rows = group_rows(evals, group)
    have = set(zip(rows.criterion, rows.sparsity))
    return [(c, float(s)) for c in criteria for s in sorted(rows.sparsity.unique()) if (c, s) not in have]


def shared_plan_keys(store_path: str | Path, model_id: str, group: dict, points: list[tuple[str, float]],
                     config=None) -> dict[tuple[str, float], str]:
    """plan_key of each (criterion, sparsity) plan of a group, rebuilt from the stored statistics.

    Points whose plan cannot be built (a criterion without its data, a sparsity the
    router cannot keep) are left out.
    """
    extra = {"top_k": int(group["plan_top_k"])} if group["plan_top_k"] >= 0 else {}
    keys = {}
    for criterion, sparsity in points:
        try:
            plan = build_plan(store_path, model_id, criterion, json.loads(group["domains"]), config=config,
                              sparsity=sparsity, scope=group["scope"], seed=int(group["seed"]), **extra)
        except MoeVizError:
            continue
        if plan.sparsity == sparsity:
            keys[(criterion, sparsity)] = plan_key(plan, int(group["seed"]))
    return keys


def fully_shared_criteria(store_path: str | Path, model_id: str, evals: pd.DataFrame, group: dict,
                          candidates: list[str], config=None) -> list[str]:
    """Candidates without rows of their own in a group whose plan at every sparsity of the group was
    evaluated on the group's evaluation sets under another criterion or setting: a sweep stores a plan
    once, under the first criterion (and calibration mix) that built it, so a criterion that always
    keeps the same experts as another has no rows of its own.
    Checks the highest sparsity first and stops at the first plan that was not evaluated."""
    rows = group_rows(evals, group)
    stored, own = set(on_panel_sets(evals, group).plan_key), set(rows.criterion)
    sparsities = sorted(rows.sparsity.unique(), reverse=True)
    return [c for c in candidates if c not in own and sparsities and all(
        shared_plan_keys(store_path, model_id, group, [(c, float(s))], config).get((c, float(s))) in stored
        for s in sparsities)]


def curves(evals: pd.DataFrame, group: dict, criteria: list[str],
           shared: dict[tuple[str, float], str] | None = None) -> pd.DataFrame:
    """One row per (criterion, sparsity, evaluation domain) of a group: the stored numbers and their
    95% intervals (kl, nll_delta = nll_pruned - nll_original, top1_agreement; *_ci_low/high).

    A point stored under its own criterion comes from that row (the newest on the domain's
    evaluation set, `panel_sets`); otherwise, when `shared` gives the key of the criterion's
    plan, from the row of the same plan stored under another criterion (`shared_with`).
    """
    evals = evals.assign(nll_delta=evals.nll_pruned - evals.nll_original)
    on_set = on_panel_sets(evals, group).sort_values("created_at", ascending=False)
    direct = on_set[_in_group(on_set, group) & on_set.criterion.isin(criteria)]
    direct = direct.drop_duplicates(["criterion", "sparsity", "eval_domain"]).assign(shared_with=None)
    frames = [direct]
    for (criterion, sparsity), key in (shared or {}).items():
        if criterion not in criteria or ((direct.criterion == criterion) & (direct.sparsity == sparsity)).any():
            continue
        rows = on_set[on_set.plan_key == key].drop_duplicates("eval_domain")
        frames.append(rows.assign(shared_with=rows.criterion, criterion=criterion, sparsity=sparsity))
    out = pd.concat(frames, ignore_index=True)
    columns = ["criterion", "sparsity", "eval_domain", "tokens", "nll_original", "nll_pruned", *METRICS,
               *[f"{m}_ci_{end}" for m in METRICS for end in ("low", "high")], "plan_key", "eval_set",
               "shared_with", "created_at"]
    return out[columns].sort_values(["eval_domain", "criterion", "sparsity"]).reset_index(drop=True)


def results_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Plan evaluations as shown to people: per evaluation domain, NLLs, ΔNLL, KL and top-1 agreement
    with their 95% bootstrap intervals (nats per token)."""
    rows = rows.assign(nll_delta=rows.nll_pruned - rows.nll_original)
    keep = [c for c in ("criterion", "sparsity") if c in rows.columns]
    table = rows[keep + ["eval_domain", "tokens", "nll_original", "nll_pruned", "nll_delta", "nll_delta_ci_low",
                         "nll_delta_ci_high", "kl", "kl_ci_low", "kl_ci_high", "top1_agreement",
                         "top1_agreement_ci_low", "top1_agreement_ci_high"]]
    return table.rename(columns={"eval_domain": "evaluation domain"}).reset_index(drop=True)


# -- the cut trade-off ------------------------------------------------------------------

def tradeoff_keeps(valid_keeps: list[int], num_experts: int, points: int = 8) -> list[int]:
    """Up to `points` experts-kept counts spread over the valid ones that drop something, most kept first."""
    keeps = sorted((k for k in valid_keeps if k < num_experts), reverse=True)
    if len(keeps) <= points:
        return keeps
    picks = np.unique(np.round(np.linspace(0, len(keeps) - 1, points)).astype(int))
    return [keeps[i] for i in picks]


def _criterion_tradeoff(store_path, model_id: str, domains: dict[str, float], criterion: str, keeps: list[int],
                        config) -> list[dict]:
    weights = pd.Series(domains, dtype=float) / sum(domains.values())
    rows = []
    for keep in keeps:
        plan = build_plan(store_path, model_id, criterion, domains, config=config, keep=keep)
        lost = preview(plan, store_path, list(domains)).groupby("domain")[["routed_share_lost", "reap_share_lost"]].mean()
        mixed = lost.mul(weights, axis=0).sum()
        rows.append({"criterion": criterion, "keep": keep, "sparsity": plan.sparsity,
                     "routed_share_lost": mixed.routed_share_lost, "reap_share_lost": mixed.reap_share_lost})
    return rows


def cut_tradeoff(store_path: str | Path, model_id: str, domains: dict[str, float], criteria: list[str],
                 keeps: list[int], config=None, workers: int = 2) -> tuple[pd.DataFrame, list[str]]:
    """For each criterion and experts-kept count, the plan's sparsity and what its dropped experts carried
    on the calibration mix: routed_share_lost (share of the routed token slots) and reap_share_lost
    (share of the REAP saliency mass), each the mean over MoE layers per domain (`plan.preview`), then
    averaged over the mix's domains with the mix's weights. Also one note per criterion left out.

    Criteria are worked on by `workers` threads (each plan mostly waits on its own store reads)."""
    def one(criterion: str) -> list[dict] | str:
        try:
            return _criterion_tradeoff(store_path, model_id, domains, criterion, keeps, config)
        except MoeVizError as exc:
            return f"{criterion}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = list(pool.map(one, criteria))
    rows = [row for result in done if isinstance(result, list) for row in result]
    columns = ["criterion", "keep", "sparsity", "routed_share_lost", "reap_share_lost"]
    return pd.DataFrame(rows, columns=columns), [result for result in done if isinstance(result, str)]
