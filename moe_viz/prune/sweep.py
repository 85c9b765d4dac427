"""Sweeps: quality vs sparsity for several criteria, every result kept in the store.

Each (criterion, sparsity, scope) gives a plan (`plan.build_plan`); each plan is
evaluated without export (`evaluate.evaluate_plan`) on the same evaluation sets.
A result is stored under a key made of the model's fingerprint, the plan's kept
experts, the bootstrap seed and a hash of the evaluation tokens, so repeating a
sweep (or sweeping a criterion that picks the same experts) is served from the
store without a forward pass. Table `plan_evals` (docs/STORE.md).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

from moe_viz import __version__, store
from moe_viz.prune.evaluate import ReferenceBatch, evaluate_plan, reference_batches
from moe_viz.errors import MoeVizError
from moe_viz.prune.plan import PrunePlan, build_plan

RESULT_COLUMNS = ("tokens", "sequences", "nll_original", "nll_pruned", "kl", "top1_agreement")
CI_COLUMNS = ("kl_ci", "nll_delta_ci", "top1_agreement_ci")


@dataclass
class SweepProgress:
    done: int
    total: int
    cached: int
    elapsed_s: float

    @property
    def eta_s(self) -> float:
        computed = self.done - self.cached
        remaining = self.total - self.done
        return self.elapsed_s / computed * remaining if computed else float("nan")


def sequences_key(sequences: list[list[int]]) -> str:
    """A hash of an evaluation set's exact tokens."""
    return hashlib.sha256(json.dumps(sequences, separators=(",", ":")).encode()).hexdigest()[:16]


def eval_set_keys(sequences: dict[str, list[list[int]]]) -> dict[str, str]:
    """Evaluation domain -> hash of its tokens (the `eval_set` of stored results)."""
    return {domain: sequences_key(seqs) for domain, seqs in sequences.items()}


def plan_key(plan: PrunePlan, seed: int) -> str:
    """What a plan's evaluation depends on: the weights, the kept experts (and lowered top-k) and the bootstrap seed."""
    kept = {str(layer): experts for layer, experts in sorted(plan.kept.items())}
    payload = json.dumps([plan.model_fingerprint, kept, seed] + ([plan.top_k] if plan.top_k is not None else []),
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stored_results(store_path: str | Path, key: str, eval_sets: dict[str, str]) -> list[dict] | None:
    """The stored per-domain results of one plan on these evaluation sets, or None if any is missing."""
    with store.connect(store_path, read_only=True) as con:
        rows = con.execute(
            "SELECT * FROM plan_evals WHERE plan_key = ? AND eval_set IN (SELECT unnest(?))",
            [key, list(eval_sets.values())],
        ).df()
    found = {(r.eval_domain, r.eval_set): r for r in rows.itertuples()}
    if not all((d, s) in found for d, s in eval_sets.items()):
        return None
    out = []
    for domain, eval_set in eval_sets.items():
        r = found[(domain, eval_set)]
        out.append({"domain": domain, **{c: getattr(r, c) for c in RESULT_COLUMNS},
                    **{c: [getattr(r, f"{c}_low"), getattr(r, f"{c}_high")] for c in CI_COLUMNS}})
    for result in out:
        result["tokens"], result["sequences"] = int(result["tokens"]), int(result["sequences"])
    return out


def save_results(store_path: str | Path, key: str, plan: PrunePlan, results: list[dict],
                 eval_sets: dict[str, str], seed: int) -> None:
    """Store one plan's per-domain results (replacing earlier rows with the same key and set)."""
    rows = pd.DataFrame([{
        "plan_key": key, "eval_domain": r["domain"], "eval_set": eval_sets[r["domain"]],
        "model_id": plan.model_id, "model_fingerprint": plan.model_fingerprint, "criterion": plan.criterion,
        "scope": plan.scope, "sparsity": plan.sparsity, "domains": json.dumps(plan.domains, sort_keys=True),
        "plan": plan.to_json(), "seed": seed, **{c: r[c] for c in RESULT_COLUMNS},
        **{f"{c}_{end}": r[c][i] for c in CI_COLUMNS for i, end in enumerate(("low", "high"))},
        "created_at": datetime.now(timezone.utc).replace(tzinfo=None), "tool_version": __version__,
    } for r in results])
    store.write_frame(store_path, [
        ("DELETE FROM plan_evals WHERE plan_key = ? AND eval_set IN (SELECT unnest(?))", [key, list(rows.eval_set)]),
        ("INSERT INTO plan_evals BY NAME SELECT * FROM incoming", []),
    ], rows)


def sweep_plans(store_path: str | Path, model_id: str, criteria: list[str], sparsities: list[float],
                domains: dict[str, float], config, scopes: tuple[str, ...] = ("uniform",),
                seed: int = 0, top_k: int | None = None) -> list[PrunePlan]:
    """Every (criterion, sparsity, scope) plan, built before any forward pass so bad input fails at once.

    The `random` baseline is always included.
    """
    criteria = list(dict.fromkeys([*criteria, "random"]))
    if not sparsities:
        raise MoeVizError("give at least one sparsity, e.g. --sparsities 0.25,0.5")
    return [build_plan(store_path, model_id, criterion, domains, config=config, sparsity=sparsity, scope=scope,
                       seed=seed, top_k=top_k)
            for criterion in criteria for sparsity in sparsities for scope in scopes]


def run_sweep(model, store_path: str | Path, plans: list[PrunePlan], sequences: dict[str, list[list[int]]],
              batch_size: int = 8, seed: int = 0,
              progress: Callable[[SweepProgress], None] | None = None) -> list[dict]:
    """Evaluate each plan (from the store when already evaluated on these tokens); one row per plan and domain.

    Rows carry the per-domain results of `evaluate_plan` plus criterion, sparsity (the fraction of
    routed experts the plan removes), scope, top_k (None: the model's) and cached.
    """
    eval_sets = eval_set_keys(sequences)
    references: dict[str, list[ReferenceBatch]] | None = None
    rows, cached_count, started = [], 0, time.monotonic()
    for number, plan in enumerate(plans, start=1):
        key = plan_key(plan, seed)
        results = stored_results(store_path, key, eval_sets)
        cached = results is not None
        if not cached:
            if references is None:  # the unpruned model's distributions, once, only if something is new
                references = {d: reference_batches(model, seqs, batch_size) for d, seqs in sequences.items()}
            results = evaluate_plan(model, plan.dropped, references, seed=seed, top_k=plan.top_k)
            save_results(store_path, key, plan, results, eval_sets, seed)
        cached_count += cached
        rows += [{**r, "criterion": plan.criterion, "sparsity": plan.sparsity, "scope": plan.scope,
                  "top_k": plan.top_k, "cached": cached} for r in results]
        if progress is not None:
            progress(SweepProgress(number, len(plans), cached_count, time.monotonic() - started))
    return rows


def _read_evals(store_path: str | Path, where: str, params: list) -> pd.DataFrame:
    """plan_evals rows without the plan JSON, plus `plan_top_k` (its lowered top-k, -1 for the model's);
    an empty frame from a store older than the table (readers do not migrate: it has no evaluations yet)."""
    with store.connect(store_path, read_only=True) as con:
        has_table = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
                                "AND table_name = 'plan_evals'").fetchone()[0]
        if not has_table:
            return pd.DataFrame()
        return con.execute("SELECT * EXCLUDE (plan), coalesce(json_extract(plan, '$.top_k')::INTEGER, -1) AS plan_top_k "
                           f"FROM plan_evals WHERE {where} "
                           "ORDER BY criterion, sparsity, eval_domain", params).df()


def stored_sweeps(store_path: str | Path, model_id: str) -> pd.DataFrame:
    """Every stored plan evaluation of a model (for the dashboard's Compare plans page)."""
    return _read_evals(store_path, "model_id = ?", [model_id])


def stored_plan_results(store_path: str | Path, plan: PrunePlan, seed: int = 0) -> pd.DataFrame:
    """The stored evaluations of exactly this plan (its kept experts on its weights, bootstrap `seed`):
    one row per evaluation domain and evaluation set, newest first; empty when never evaluated."""
    rows = _read_evals(store_path, "plan_key = ?", [plan_key(plan, seed)])
    if rows.empty:
        return rows
    return rows.sort_values(["eval_domain", "created_at"], ascending=[True, False]).reset_index(drop=True)
