"""The `moe-viz` command line that rebuilds a plan from the store: the dashboard's "copy as CLI command"."""

from __future__ import annotations

import shlex
from pathlib import Path

from moe_viz.errors import MoeVizError
from moe_viz.prune.plan import PrunePlan


def plan_arguments(plan: PrunePlan, store_path: str | Path) -> list[str]:
    """Arguments that make `build_plan` choose this plan again from the same store.

    The plan must come from a criterion at a fixed keep count (what the Prune page builds):
    --keep is the per-layer count (uniform) or the mean per layer (global, whose total is
    keep x layers). Weights are written in full (repr), so the mix is the same float.
    Rebuilt later, the plan uses the newest complete run of each domain, as the page does.
    """
    if plan.keep_per_layer is None and plan.scope == "uniform":
        raise MoeVizError("this plan keeps different counts per layer: save it with `search --out` and use --plan")
    total = sum(len(kept) for kept in plan.kept.values())
    keep = plan.keep_per_layer if plan.scope == "uniform" else total // len(plan.kept)
    arguments = ["--model", plan.model_id, "--store", str(Path(store_path).absolute()),
                 "--criterion", plan.criterion, "--keep", str(keep)]
    for domain, weight in plan.domains.items():
        if ":" in domain:  # NAME:WEIGHT would split it
            raise MoeVizError(f"domain {domain!r} has a ':' that the command line cannot pass")
        arguments += ["--domain", f"{domain}:{weight!r}"]
    for layer, experts in sorted(plan.protected.items()):
        arguments += [a for expert in sorted(experts) for a in ("--protect", f"{layer}:{expert}")]
    if plan.seed:
        arguments += ["--seed", str(plan.seed)]
    if plan.top_k is not None:
        arguments += ["--top-k", str(plan.top_k)]
    return arguments


def prune_command(plan: PrunePlan, store_path: str | Path, out: str | Path, force: bool = False) -> str:
    """`moe-viz prune ...` exporting this (uniform) plan to `out`, shell-quoted; `evaluate` for a global plan."""
    if plan.scope == "global":  # not exportable: the command that evaluates the same plan
        return shlex.join(["moe-viz", "evaluate", *plan_arguments(plan, store_path), "--scope", "global"])
    arguments = ["moe-viz", "prune", *plan_arguments(plan, store_path), "--out", str(Path(out).absolute())]
    return shlex.join(arguments + (["--force"] if force else []))
