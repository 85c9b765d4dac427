"""Pruning plans: which experts each MoE layer keeps, and what that costs.

A plan is built from stored statistics only (no model weights) and is a small
JSON-serialisable object carrying everything needed to reproduce it, including
the run ids of the statistics it used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from moe_viz import __version__, store
from moe_viz.analysis import criteria
from moe_viz.errors import MoeVizError

SCOPES = ("uniform", "global")


@dataclass
class RouterConstraints:
    """What a family's router needs from the kept experts."""

    top_k: int
    n_group: int = 1  # group-limited routers (DeepSeek-V3 style): experts in n_group contiguous blocks
    topk_group: int = 1

    def valid_keeps(self, num_experts: int) -> list[int]:
        """Experts-per-layer counts an exportable plan may keep."""
        out = []
        for keep in range(1, num_experts + 1):
            if keep < self.top_k:
                continue
            if self.n_group > 1:
                per_group = keep // self.n_group
                if keep % self.n_group or per_group < 2 or per_group * self.topk_group < self.top_k:
                    continue
            out.append(keep)
        return out

    @classmethod
    def from_config(cls, config, observed_top_k: int) -> "RouterConstraints":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        top_k = max(observed_top_k, int(getattr(config, "num_experts_per_tok", 0) or 0))
        return cls(
            top_k=top_k,
            n_group=int(getattr(config, "n_group", None) or 1),
            topk_group=int(getattr(config, "topk_group", None) or 1),
        )


@dataclass
class PrunePlan:
    model_id: str
    model_fingerprint: str
    criterion: str
    scope: str
    sparsity: float  # fraction of routed experts removed, over all MoE layers
    domains: dict[str, float]  # domain -> mixing weight
    run_ids: dict[str, str]  # domain -> run id of the statistics used
    num_experts: dict[int, int]  # layer -> experts before pruning
    kept: dict[int, list[int]]  # layer -> kept original expert ids, ascending
    protected: dict[int, list[int]] = field(default_factory=dict)
    seed: int = 0
    tool_version: str = __version__
    checkpoint_digest: str | None = None  # of the captured files (runs' settings); export refuses other files
    top_k: int | None = None  # experts per token after pruning (lowered top-k); None keeps the model's

    @property
    def exportable(self) -> bool:
        return len({len(v) for v in self.kept.values()}) == 1

    @property
    def keep_per_layer(self) -> int | None:
        counts = {len(v) for v in self.kept.values()}
        return counts.pop() if len(counts) == 1 else None

    @property
    def dropped(self) -> dict[int, list[int]]:
        return {layer: sorted(set(range(self.num_experts[layer])) - set(kept)) for layer, kept in self.kept.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        data = json.loads(text)
        for key in ("num_experts", "kept", "protected"):
            data[key] = {int(layer): value for layer, value in data[key].items()}
        return cls(**data)


def parse_domain_weights(specs: list[str]) -> dict[str, float]:
    """`code` or `math:0.5` -> {domain: weight}; weights must be positive."""
    weights: dict[str, float] = {}
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError as exc:
            raise MoeVizError(f"domain weight in {spec!r} is not a number: use NAME or NAME:WEIGHT") from exc
        if value <= 0:
            raise MoeVizError(f"domain weight in {spec!r} must be positive")
        if name in weights:
            raise MoeVizError(f"domain {name!r} given twice")
        weights[name] = value
    if not weights:
        raise MoeVizError("give at least one calibration --domain to score experts on")
    return weights


def complete_runs_for(store_path: str | Path, model_id: str, domains: list[str]) -> tuple[dict[str, str], str]:
    """Latest complete run id per domain for the model, and the model fingerprint."""
    runs = store.list_runs(store_path, status="complete")
    runs = runs[runs.model_id == model_id]
    if runs.empty:
        raise MoeVizError(f"the store has no complete runs for model {model_id}: run `moe-viz capture` first")
    chosen = {}
    for domain in domains:
        matching = runs[runs.domain == domain]
        if matching.empty:
            have = ", ".join(sorted(runs.domain.unique()))
            raise MoeVizError(f"no complete run for domain {domain!r} of {model_id}; captured domains: {have}")
        chosen[domain] = matching.iloc[0].run_id  # newest first
    fingerprints = runs[runs.run_id.isin(chosen.values())].model_fingerprint.unique()
    if len(fingerprints) > 1:
        raise MoeVizError(f"runs for {model_id} come from different weights ({', '.join(fingerprints)}): re-capture")
    return chosen, fingerprints[0]


def _keep_from_sparsity(sparsity: float, num_experts: int) -> int:
    if not 0 <= sparsity < 1:
        raise MoeVizError(f"sparsity {sparsity} must be in [0, 1): it is the fraction of experts removed")
    return num_experts - round(sparsity * num_experts)


def check_keep(keep: int, num_experts: int, constraints: RouterConstraints) -> None:
    """One line saying why `keep` experts per layer are not possible (and what is), if they are not."""
    valid = constraints.valid_keeps(num_experts)
    if keep in valid:
        return
    below = [k for k in valid if k < keep]
    above = [k for k in valid if k > keep]
    nearest = [k for k in (below[-1:] + above[:1])]
    options = ", ".join(f"{1 - k / num_experts:.4g} (keep {k})" for k in nearest) or "none"
    reason = f"fewer than top-k {constraints.top_k}" if keep < constraints.top_k else (
        f"not {constraints.n_group} equal groups of at least 2" if constraints.n_group > 1 else "out of range"
    )
    raise MoeVizError(
        f"keeping {keep} of {num_experts} experts per layer is not possible ({reason}); nearest valid sparsities: "
        f"{options}; keep counts possible: {', '.join(map(str, valid)) or 'none'}"
    )


def _select_uniform(ranked: pd.DataFrame, keep: int, constraints: RouterConstraints,
                    protected: dict[int, list[int]]) -> dict[int, list[int]]:
    """Per layer (and per contiguous group for group-limited routers): protected first, then best rank."""
    num_experts = int(ranked.expert.max()) + 1
    groups = constraints.n_group if constraints.n_group > 1 else 1
    per_group = keep // groups
    pinned = {(layer, e) for layer, experts in protected.items() for e in experts}
    ranked = ranked.assign(
        group=ranked.expert // (num_experts // groups),
        protected=[(l, e) in pinned for l, e in zip(ranked.layer, ranked.expert)],
    )
    crowded = ranked.groupby(["layer", "group"]).protected.sum()
    if (crowded > per_group).any():
        raise MoeVizError(f"{int(crowded.max())} protected experts in one layer/group but only {per_group} are kept there")
    chosen = ranked.sort_values(["layer", "group", "protected", "rank"], ascending=[True, True, False, True])
    chosen = chosen.groupby(["layer", "group"]).head(per_group)
    return {int(layer): sorted(int(e) for e in g.expert) for layer, g in chosen.groupby("layer")}


def _select_global(ranked: pd.DataFrame, total_keep: int, constraints: RouterConstraints,
                   protected: dict[int, list[int]]) -> dict[int, list[int]]:
    """One ranking across layers on per-layer-normalised scores; each layer keeps at least top-k."""
    ranked = ranked.assign(share=criteria.normalise_per_layer(ranked))
    ranked = ranked.assign(must=ranked.apply(
        lambda r: r["rank"] < constraints.top_k or r["expert"] in protected.get(int(r["layer"]), []), axis=1))
    ordered = ranked.sort_values(["must", "routed", "share", "layer", "expert"], ascending=[False, False, False, True, True])
    chosen = ordered.head(max(total_keep, int(ranked.must.sum())))
    return {int(layer): sorted(int(e) for e in group.expert) for layer, group in chosen.groupby("layer")}


def _ranges(numbers) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, numbers = [], sorted(numbers)
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _check_protected(protected: dict[int, list[int]], num_experts: dict[int, int]) -> None:
    """Every protected expert must exist: a typo must not silently protect nothing."""
    for layer, experts in sorted(protected.items()):
        if layer not in num_experts:
            raise MoeVizError(f"--protect {layer}:{experts[0]}: layer {layer} is not a MoE layer of this model "
                              f"(MoE layers: {_ranges(num_experts)})")
        for expert in experts:
            if not 0 <= expert < num_experts[layer]:
                raise MoeVizError(f"--protect {layer}:{expert}: layer {layer} has no expert {expert} "
                                  f"(experts 0-{num_experts[layer] - 1})")


def _captured_digest(store_path: str | Path, run_ids: dict[str, str]) -> str | None:
    """The checkpoint digest the runs recorded at capture: None if none did, comma-joined if they differ."""
    runs = store.list_runs(store_path)
    settings = runs[runs.run_id.isin(list(run_ids.values()))].settings
    digests = {json.loads(s).get("checkpoint_digest") for s in settings} - {None}
    return ",".join(sorted(digests)) or None


def build_plan(
    store_path: str | Path,
    model_id: str,
    criterion: str,
    domains: dict[str, float],
    config=None,
    sparsity: float | None = None,
    keep: int | None = None,
    scope: str = "uniform",
    protected: dict[int, list[int]] | None = None,
    seed: int = 0,
    top_k: int | None = None,
) -> PrunePlan:
    """Score experts on the given domains and choose what each layer keeps.

    Give exactly one of `sparsity` (fraction of experts removed) or `keep`
    (experts kept per layer). The router's constraints (top-k, groups) come
    from the model `config` when given, and the top-k seen in the statistics.
    """
    criteria.check_criterion(criterion)
    if scope not in SCOPES:
        raise MoeVizError(f"unknown scope {scope!r}; use uniform or global")
    if (sparsity is None) == (keep is None):
        raise MoeVizError("give exactly one of --sparsity or --keep")
    protected = {int(k): [int(e) for e in v] for k, v in (protected or {}).items()}
    run_ids, fingerprint = complete_runs_for(store_path, model_id, list(domains))
    stats = store.expert_stats(store_path, list(run_ids.values()), criteria.columns_for([criterion]))
    layer_rows = store.layer_stats(store_path, list(run_ids.values()))
    observed_top_k = int(layer_rows.top_k.max())
    constraints = RouterConstraints.from_config(config, observed_top_k) if config else RouterConstraints(observed_top_k)
    if top_k is not None:
        if not 1 <= top_k <= constraints.top_k:
            raise MoeVizError(f"--top-k {top_k} must be between 1 and the model's top-k {constraints.top_k}")
        constraints = replace(constraints, top_k=top_k)
    num_experts = {int(r.layer): int(r.num_experts) for r in layer_rows.drop_duplicates("layer").itertuples()}
    _check_protected(protected, num_experts)
    if len(set(num_experts.values())) != 1 and scope == "uniform":
        raise MoeVizError("layers have different expert counts: use --scope global")
    scored = criteria.score(stats, criterion, seed)
    unmeasured = sorted(d for d in domains if scored[scored.run_id == run_ids[d]].score.isna().any())
    if unmeasured:
        raise MoeVizError(f"criterion {criterion} has no scores for domain(s) {', '.join(unmeasured)}: "
                          f"run `moe-viz importance --model {model_id} --domain {unmeasured[0]}` first")
    per_domain = {d: scored[scored.run_id == run_ids[d]].drop(columns=["domain", "run_id"]) for d in domains}
    ranked = criteria.rank(criteria.mixed_scores(per_domain, domains))
    E = next(iter(num_experts.values()))
    total = sum(num_experts.values())

    if scope == "uniform":
        keep = _keep_from_sparsity(sparsity, E) if keep is None else keep
        check_keep(keep, E, constraints)
        kept = _select_uniform(ranked, keep, constraints, protected)
    else:
        total_keep = total - round(sparsity * total) if keep is None else keep * len(num_experts)
        if sparsity is not None and not 0 <= sparsity < 1:
            raise MoeVizError(f"sparsity {sparsity} must be in [0, 1)")
        kept = _select_global(ranked, total_keep, constraints, protected)
    removed = total - sum(len(v) for v in kept.values())
    return PrunePlan(
        model_id=model_id, model_fingerprint=fingerprint, criterion=criterion, scope=scope,
        sparsity=removed / total, domains=dict(domains), run_ids=run_ids, num_experts=num_experts,
        kept=kept, protected=protected, seed=seed, checkpoint_digest=_captured_digest(store_path, run_ids), top_k=top_k,
    )


def preview(plan: PrunePlan, store_path: str | Path, domains: list[str] | None = None) -> pd.DataFrame:
    """Per layer and domain: share of routed tokens and of REAP mass carried by the dropped experts.

    `domains` defaults to every domain with a complete run for the plan's model.
    """
    runs = store.list_runs(store_path, status="complete")
    runs = runs[(runs.model_id == plan.model_id) & (runs.model_fingerprint == plan.model_fingerprint)]
    if domains is not None:
        runs = runs[runs.domain.isin(domains)]
    runs = runs.drop_duplicates("domain")  # newest per domain
    stats = store.expert_stats(store_path, runs.run_id.tolist(), ["routed_tokens", "reap_sum"])
    width = int(stats.expert.max()) + 1 if len(stats) else 1
    flags = np.zeros((max(plan.num_experts, default=0) + 1) * width, dtype=bool)
    for layer, experts in plan.dropped.items():
        flags[[layer * width + e for e in experts]] = True
    dropped = flags[stats.layer.to_numpy() * width + stats.expert.to_numpy()]
    stats = stats.assign(dropped_tokens=np.where(dropped, stats.routed_tokens, 0),
                         dropped_reap=np.where(dropped, stats.reap_sum, 0.0))
    out = stats.groupby(["domain", "layer"], as_index=False, observed=True)[
        ["routed_tokens", "dropped_tokens", "reap_sum", "dropped_reap"]
    ].sum()
    out["domain"] = out.domain.astype(str)
    out["routed_share_lost"] = out.dropped_tokens / out.routed_tokens.where(out.routed_tokens > 0)
    out["reap_share_lost"] = out.dropped_reap / out.reap_sum.where(out.reap_sum > 0)
    return out[["domain", "layer", "routed_share_lost", "reap_share_lost"]].fillna(0.0)


def size_summary(plan: PrunePlan, config) -> dict:
    """Parameters and bytes before/after, from the config alone (a model built on the meta device)."""
    import torch

    from moe_viz.models.discovery import expert_modules, find_moe_layers
    from moe_viz.models.loading import model_class_for

    with torch.device("meta"):
        model = model_class_for(config).from_config(config)
    total = sum(p.numel() for p in model.parameters())
    removed = 0
    for layer in find_moe_layers(model):
        per_expert = sum(p.numel() for m in expert_modules(layer) for p in m.parameters()) // layer.num_experts
        per_router_row = sum(p.numel() for p in layer.router.parameters() if p.shape[0] == layer.num_experts) // layer.num_experts
        removed += (per_expert + per_router_row) * len(plan.dropped.get(layer.layer, []))
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {
        "params_before": total, "params_after": total - removed,
        "bytes_before": total * itemsize, "bytes_after": (total - removed) * itemsize,
        "dtype": str(dtype).removeprefix("torch."),
    }
