"""Evolutionary search for pruning plans (EEP / EvoESAP style), fitness = mean KL on evaluation text.

An individual is a keep-set per MoE layer. Its fitness is the mean over evaluation
domains of `evaluate.evaluate_plan(...)["kl"]`, the mean KL(original ‖ pruned) per token
with its dropped experts masked; lower is better. A plan's fitness is cached by its
kept sets, so meeting it again costs nothing.

- uniform mode: every layer keeps the same K (the plan exports).
- nonuniform mode: per-layer budgets with a fixed total, each a count the router allows
  (≥ top-k; equal per group for group-limited routers). For evaluation only: stock
  transformers configs hold one expert count for every MoE layer, so it cannot export.

The population starts from the seed plans (e.g. every criterion's plan and the
enumeration plan) and mutants of them. Each generation keeps the best quarter
(elitism: the best fitness never gets worse) and breeds the rest: tournament
selection of two, crossover (each layer's keep-set from either parent; budgets
repaired to the total in nonuniform mode) with probability 1/2, then one or more
mutations: swap a kept expert for a dropped one of the same layer (and router
group), or in nonuniform mode (one time in three) move one step of budget from one
layer to another. All random choices come from `random.Random(seed)`; the optional
wall-clock budget only decides whether another generation starts.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from torch import nn

from moe_viz.prune.evaluate import ReferenceBatch, evaluate_plan
from moe_viz.errors import MoeVizError
from moe_viz.prune.plan import PrunePlan, RouterConstraints

MODES = ("uniform", "nonuniform")
NONUNIFORM_NOTE = ("not exportable: its layers keep different numbers of experts, and a stock transformers "
                   "config holds one expert count for every MoE layer; evaluate it with `moe-viz evaluate --plan`")

Individual = tuple[tuple[int, tuple[int, ...]], ...]  # ((layer, kept ids ascending), ...) by layer


def individual(kept: dict[int, list[int]]) -> Individual:
    return tuple((int(layer), tuple(sorted(int(e) for e in kept[layer]))) for layer in sorted(kept))


class PlanFitness:
    """Mean over evaluation domains of the per-token KL(original ‖ pruned); cached by kept sets."""

    def __init__(self, model: nn.Module, references: dict[str, list[ReferenceBatch]],
                 num_experts: dict[int, int], seed: int = 0):
        if not references:
            raise MoeVizError("the search needs at least one evaluation domain")
        self.model, self.references, self.num_experts, self.seed = model, references, num_experts, seed
        self.cache: dict[Individual, float] = {}

    @property
    def evaluations(self) -> int:
        """Forward passes made (distinct plans evaluated)."""
        return len(self.cache)

    def __call__(self, ind: Individual) -> float:
        if ind not in self.cache:
            dropped = {layer: sorted(set(range(self.num_experts[layer])) - set(kept)) for layer, kept in ind}
            results = evaluate_plan(self.model, dropped, self.references, seed=self.seed)
            self.cache[ind] = statistics.fmean(float(r["kl"]) for r in results)
        return self.cache[ind]


@dataclass
class SearchProgress:
    generation: int  # 0 = the initial population
    generations: int
    best_fitness: float
    evaluations: int
    elapsed_s: float


@dataclass
class SearchResult:
    plan: PrunePlan  # criterion "search"
    fitness: float
    history: list[dict]  # per generation: generation, best_fitness, mean_fitness, evaluations, elapsed_s
    seeds: list[dict]  # per seed plan: name, fitness (search fitness set)
    best_seed: str
    best_seed_fitness: float
    evaluations: int
    stopped: str  # "generations" or "time budget"
    mode: str
    note: str = ""  # why a nonuniform plan does not export
    best_is_seed: str | None = None  # the seed plan the best individual equals, if any
    evaluated: dict[Individual, float] | None = None  # every plan evaluated -> its fitness


class _Space:
    """What keep-sets are allowed: per-layer counts, router groups, and the operators over them."""

    def __init__(self, num_experts: dict[int, int], constraints: RouterConstraints, mode: str, total: int):
        self.num_experts, self.mode, self.total = num_experts, mode, total
        self.groups = constraints.n_group if constraints.n_group > 1 else 1
        self.valid = {layer: set(constraints.valid_keeps(E)) for layer, E in num_experts.items()}
        self.layers = sorted(num_experts)

    def group(self, layer: int, expert: int) -> int:
        return expert // (self.num_experts[layer] // self.groups)

    def problem(self, ind: Individual) -> str | None:
        kept = dict(ind)
        if sorted(kept) != self.layers:
            return f"its layers {sorted(kept)} are not the model's MoE layers {self.layers}"
        for layer, experts in ind:
            E = self.num_experts[layer]
            if len(set(experts)) != len(experts) or any(not 0 <= e < E for e in experts):
                return f"layer {layer} keeps invalid expert ids {list(experts)}"
            if len(experts) not in self.valid[layer]:
                return f"layer {layer} keeps {len(experts)} experts; the router allows {sorted(self.valid[layer])}"
            counts = {self.group(layer, e) for e in experts}
            if self.groups > 1 and (len(counts) != self.groups or len({sum(1 for e in experts if self.group(layer, e) == g)
                                                                            for g in range(self.groups)}) != 1):
                return f"layer {layer} does not keep the same number of experts in each of {self.groups} router groups"
        sizes = {len(experts) for _, experts in ind}
        if self.mode == "uniform" and len(sizes) != 1:
            return "its layers keep different numbers of experts (uniform mode)"
        if sum(len(experts) for _, experts in ind) != self.total:
            return f"it keeps {sum(len(e) for _, e in ind)} experts in all, not {self.total}"
        return None

    # -- operators (all randomness from `rng`) --

    def swap(self, ind: Individual, rng: random.Random) -> Individual:
        """Swap one kept expert of a random layer for a dropped one of the same router group."""
        kept = dict(ind)
        for layer in rng.sample(self.layers, len(self.layers)):
            pairs = [(k, d) for k in kept[layer] for d in range(self.num_experts[layer])
                     if d not in kept[layer] and self.group(layer, d) == self.group(layer, k)]
            if pairs:
                out, into = rng.choice(pairs)
                kept[layer] = tuple(sorted(set(kept[layer]) - {out} | {into}))
                return individual(kept)
        return ind

    def _resize(self, kept: list[int], layer: int, step: int, rng: random.Random) -> tuple[int, ...]:
        """Add (step > 0) or remove one random expert per router group."""
        kept = set(kept)
        size = self.num_experts[layer] // self.groups
        for g in range(self.groups):
            members = range(g * size, (g + 1) * size)
            pool = sorted(e for e in members if (e in kept) == (step < 0))
            pick = rng.choice(pool)
            kept = kept - {pick} if step < 0 else kept | {pick}
        return tuple(sorted(kept))

    def move_budget(self, ind: Individual, rng: random.Random) -> Individual:
        """Move one step of budget (one expert per router group) from one layer to another."""
        kept = dict(ind)
        step = self.groups
        donors = [l for l in self.layers if len(kept[l]) - step in self.valid[l]]
        takers = [l for l in self.layers if len(kept[l]) + step in self.valid[l]]
        moves = [(a, b) for a in donors for b in takers if a != b]
        if not moves:
            return ind
        a, b = rng.choice(moves)
        kept[a] = self._resize(kept[a], a, -step, rng)
        kept[b] = self._resize(kept[b], b, step, rng)
        return individual(kept)

    def mutate(self, ind: Individual, rng: random.Random) -> Individual:
        count = 1
        while count < 4 and rng.random() < 0.5:
            count += 1
        for _ in range(count):
            if self.mode == "nonuniform" and rng.random() < 1 / 3:
                ind = self.move_budget(ind, rng)
            else:
                ind = self.swap(ind, rng)
        return ind

    def crossover(self, a: Individual, b: Individual, rng: random.Random) -> Individual:
        """Each layer's keep-set from one parent; in nonuniform mode budgets repaired to the total."""
        pa, pb = dict(a), dict(b)
        kept = {layer: (pa if rng.random() < 0.5 else pb)[layer] for layer in self.layers}
        step = self.groups
        while (have := sum(map(len, kept.values()))) != self.total:
            direction = -step if have > self.total else step
            layers = [l for l in self.layers if len(kept[l]) + direction in self.valid[l]]
            if not layers:  # cannot happen for totals reachable by valid budgets; keep a parent
                return a
            layer = rng.choice(layers)
            kept[layer] = self._resize(kept[layer], layer, direction, rng)
        return individual(kept)


def _tournament(population: list[Individual], fitness: PlanFitness, rng: random.Random) -> Individual:
    a, b = rng.choice(population), rng.choice(population)
    return min((a, b), key=lambda ind: (fitness(ind), ind))


def search(model: nn.Module, references: dict[str, list[ReferenceBatch]], seed_plans: list[PrunePlan],
           constraints: RouterConstraints, *, mode: str = "uniform", generations: int = 10, population: int = 8,
           time_budget_s: float | None = None, seed: int = 0,
           progress: Callable[[SearchProgress], None] | None = None,
           seed_names: list[str] | None = None) -> SearchResult:
    """Search for the plan with the smallest mean KL on `references`, starting from `seed_plans`.

    Every seed plan must satisfy the mode (uniform: one count per layer; nonuniform: the
    same total as the others) and the router's `constraints`. Returns the best plan (never
    worse than the best seed on this fitness), its fitness and per-generation history.
    """
    if mode not in MODES:
        raise MoeVizError(f"unknown search mode {mode!r}: use uniform or nonuniform")
    if generations < 0 or population < 2:
        raise MoeVizError("the search needs --generations ≥ 0 and --population ≥ 2")
    if not seed_plans:
        raise MoeVizError("the search needs at least one seed plan")
    names = list(seed_names or [p.criterion for p in seed_plans])
    template = seed_plans[0]
    num_experts = {int(k): int(v) for k, v in template.num_experts.items()}
    space = _Space(num_experts, constraints, mode, sum(len(v) for v in template.kept.values()))
    seeds: dict[Individual, str] = {}
    for name, plan in zip(names, seed_plans):
        if getattr(plan, "top_k", None) is not None:
            raise MoeVizError(f"seed plan {name} lowers top-k to {plan.top_k}: the search keeps the model's top-k")
        ind = individual(plan.kept)
        problem = space.problem(ind) if plan.num_experts == template.num_experts else "other MoE layers or counts"
        if problem:
            raise MoeVizError(f"seed plan {name} cannot seed a {mode} search: {problem}")
        seeds.setdefault(ind, name)
    fitness = PlanFitness(model, references, num_experts, seed)
    rng = random.Random(seed)
    started = time.perf_counter()
    seed_rows = [{"name": name, "fitness": fitness(individual(plan.kept))} for name, plan in zip(names, seed_plans)]
    ranked_seeds = sorted(seeds, key=lambda ind: (fitness(ind), ind))

    current = ranked_seeds[:population]
    attempts = 0
    while len(current) < population and attempts < 50 * population:
        child = space.mutate(ranked_seeds[attempts % len(ranked_seeds)], rng)
        attempts += 1
        if child not in current:
            current.append(child)
    history: list[dict] = []

    def record(generation: int) -> None:
        values = [fitness(ind) for ind in current]
        history.append({"generation": generation, "best_fitness": min(values), "mean_fitness": statistics.fmean(values),
                        "evaluations": fitness.evaluations, "elapsed_s": time.perf_counter() - started})
        if progress:
            progress(SearchProgress(generation, generations, min(values), fitness.evaluations,
                                    history[-1]["elapsed_s"]))

    current.sort(key=lambda ind: (fitness(ind), ind))
    record(0)
    stopped = "generations"
    elite = max(1, len(current) // 4)
    for generation in range(1, generations + 1):
        if time_budget_s is not None and time.perf_counter() - started >= time_budget_s:
            stopped = "time budget"
            break
        elites = current[:elite]
        children: list[Individual] = []
        while len(elites) + len(children) < population:
            fallback = None
            for _ in range(20):  # prefer a plan not yet evaluated, then one not in the population
                if rng.random() < 0.5:
                    child = space.crossover(_tournament(current, fitness, rng), _tournament(current, fitness, rng), rng)
                    child = space.mutate(child, rng) if rng.random() < 0.5 else child
                else:
                    child = space.mutate(_tournament(current, fitness, rng), rng)
                if child in elites or child in children:
                    continue
                fallback = fallback or child
                if child not in fitness.cache:
                    fallback = child
                    break
            if fallback is None:
                break  # the neighbourhood is exhausted: a smaller generation
            children.append(fallback)
        current = sorted(elites + children, key=lambda ind: (fitness(ind), ind))
        record(generation)

    best = current[0]
    total = sum(num_experts.values())
    kept = {layer: list(experts) for layer, experts in best}
    plan = PrunePlan(**{**vars(template), "criterion": "search", "scope": mode, "kept": kept, "protected": {},
                        "num_experts": num_experts, "seed": seed,
                        "sparsity": (total - sum(map(len, kept.values()))) / total})
    best_seed = min(seed_rows, key=lambda row: row["fitness"])
    return SearchResult(
        plan=plan, fitness=fitness(best), history=history, seeds=seed_rows, best_seed=best_seed["name"],
        best_seed_fitness=best_seed["fitness"], evaluations=fitness.evaluations, stopped=stopped, mode=mode,
        note="" if plan.exportable else NONUNIFORM_NOTE, best_is_seed=seeds.get(best), evaluated=dict(fitness.cache),
    )


# -- helpers for running a search on evaluation text -------------------------------------

def split_halves(sequences: dict[str, list[list[int]]]) -> tuple[dict[str, list[list[int]]], dict[str, list[list[int]]]]:
    """Per domain, the first half of its sequences (for the search) and the second half (held out).

    Evaluation sequences are packed in document order, so the halves are different text.
    A domain needs at least two sequences.
    """
    first, second = {}, {}
    for domain, seqs in sequences.items():
        if len(seqs) < 2:
            raise MoeVizError(f"evaluation domain {domain} has {len(seqs)} sequence(s); the search needs at least 2 "
                              "(half to search on, half held out): raise --max-tokens or lower --seq-len")
        half = len(seqs) // 2
        first[domain], second[domain] = seqs[:half], seqs[half:]
    return first, second


def interleave(sequences: dict[str, list[list[int]]]) -> list[list[int]]:
    """Round-robin over domains (in order), so a token budget samples every domain."""
    out, columns = [], list(sequences.values())
    for i in range(max(map(len, columns), default=0)):
        out.extend(column[i] for column in columns if i < len(column))
    return out


def plan_problem(plan: PrunePlan, constraints: RouterConstraints, mode: str, total: int) -> str | None:
    """Why `plan` cannot seed a `mode` search keeping `total` experts in all (None if it can)."""
    space = _Space({int(k): int(v) for k, v in plan.num_experts.items()}, constraints, mode, total)
    return space.problem(individual(plan.kept))
