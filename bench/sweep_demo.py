"""A full sweep on the offline demo: every routing criterion x 5 sparsities, all built-in domains.

    python bench/sweep_demo.py [--store S.duckdb] [--reps 2] [--write]   # default: a temporary store

Captures the demo domains (once; `moe_viz.demo.prepare`), then times `moe-viz sweep`'s core on a
fresh results table (emptied before every repetition): plans scored on the equal mix of all five
domains, each evaluated on every domain's held-out text (2048 tokens per domain). Reports the wall
and CPU time, how many plans needed a forward pass (plans keeping the same experts share one), and
the best criterion per domain at 50% (deterministic: the same in every repetition).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import duckdb
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from benchlib import machine, spread, table, write_section
from moe_viz.analysis import criteria
from moe_viz import demo
from moe_viz.prune.evaluate import evaluation_sequences
from moe_viz.models.loading import canonical_model_id
from moe_viz.prune.sweep import run_sweep, sweep_plans

SPARSITIES = [0.25, 0.375, 0.5, 0.625, 0.75]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store for the demo captures (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="moe_viz_sweep_demo_") as tmp:
        if args.store is None:
            args.store = str(Path(tmp) / "demo.duckdb")
        run(args)


def run(args) -> None:
    demo.prepare(args.store)
    path = demo.shipped_model()
    model_id = canonical_model_id(str(path))
    names = [c for c in criteria.CRITERIA if c not in ("random", "reconstruction")]
    domains = {d: 1.0 for d in demo.corpora.DOMAINS}

    walls, cpus = [], []
    for _ in range(args.reps):
        with duckdb.connect(args.store) as con:
            con.execute("DELETE FROM plan_evals")  # time the sweep itself, not the store's cache
        started, started_cpu = time.perf_counter(), time.process_time()
        plans = sweep_plans(args.store, model_id, names, SPARSITIES, domains, AutoConfig.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        sequences, _ = evaluation_sequences(args.store, plans[0], tokenizer, len(tokenizer))
        rows = run_sweep(model, args.store, plans, sequences)
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - started_cpu)
    distinct = len({tuple(map(tuple, p.kept.values())) for p in plans})
    tokens = sum(map(len, next(iter(sequences.values()))))
    half = [r for r in rows if r["sparsity"] == 0.5]
    table_rows = []
    for domain in sequences:
        ranked = sorted((r["kl"], r["criterion"]) for r in half if r["domain"] == domain)
        best, worst = ranked[0], ranked[-1]
        random_kl = next(kl for kl, c in ranked if c == "random")
        table_rows.append([domain, best[1], f"{best[0]:.3f}", f"{random_kl:.3f}", f"{worst[1]} {worst[0]:.3f}"])
    body = "\n".join([
        f"{len(plans)} plans ({len(names) + 1} criteria incl. `random` × sparsities "
        f"{', '.join(map(str, SPARSITIES))}; {distinct} distinct kept sets, evaluated once each), scored on the equal "
        f"mix of the {len(domains)} built-in domains and evaluated on {len(sequences)} domains' held-out text "
        f"({tokens:,} tokens each), from an empty `plan_evals` table: **{spread(walls, '{:.1f}')} s wall**, "
        f"{spread(cpus, '{:.1f}')} s CPU, against the 3-minute target; {args.threads} torch thread(s). KL at 50% "
        "sparsity, best criterion per evaluation domain (deterministic):", "",
        table(["domain", "best", "KL", "random", "worst"], table_rows), "",
        f"Machine: {machine(args.threads)}."])
    print(body)
    if args.write:
        write_section("sweep-demo", body)


if __name__ == "__main__":
    main()
