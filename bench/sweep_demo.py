"""A full sweep on the offline demo: every routing criterion x 5 sparsities, all built-in domains.

    python bench/sweep_demo.py [--store /tmp/sweep_demo.duckdb]

Captures the demo domains (once; `moe_viz.demo.prepare`), then times `moe-viz sweep`'s core on a
fresh results table: plans scored on the equal mix of all five domains, each evaluated on every
domain's held-out text (2048 tokens per domain). Prints the wall time, how many plans needed a
forward pass (plans keeping the same experts share one), and the best criterion per domain at 50%.
"""

from __future__ import annotations

import argparse
import time

import duckdb
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moe_viz.analysis import criteria
from moe_viz import demo
from moe_viz.prune.evaluate import evaluation_sequences
from moe_viz.models import canonical_model_id
from moe_viz.prune.sweep import run_sweep, sweep_plans

SPARSITIES = [0.25, 0.375, 0.5, 0.625, 0.75]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/sweep_demo.duckdb")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo.prepare(args.store)
    with duckdb.connect(args.store) as con:
        con.execute("DELETE FROM plan_evals")  # time the sweep itself, not the store's cache
    path = demo.shipped_model()
    model_id = canonical_model_id(str(path))
    names = [c for c in criteria.CRITERIA if c not in ("random", "reconstruction")]
    domains = {d: 1.0 for d in demo.corpora.DOMAINS}

    started = time.perf_counter()
    plans = sweep_plans(args.store, model_id, names, SPARSITIES, domains, AutoConfig.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sequences, _ = evaluation_sequences(args.store, plans[0], tokenizer, len(tokenizer))
    rows = run_sweep(model, args.store, plans, sequences)
    elapsed = time.perf_counter() - started
    distinct = len({tuple(map(tuple, p.kept.values())) for p in plans})
    print(f"{len(plans)} plans ({len(names) + 1} criteria x {len(SPARSITIES)} sparsities), {distinct} distinct, "
          f"{len(sequences)} evaluation domains x {sum(map(len, next(iter(sequences.values()))))} tokens: "
          f"{elapsed:.1f} s wall, threads {args.threads}")
    half = [r for r in rows if r["sparsity"] == 0.5]
    for domain in sequences:
        ranked = sorted((r["kl"], r["criterion"]) for r in half if r["domain"] == domain)
        best, worst = ranked[0], ranked[-1]
        random_kl = next(kl for kl, c in ranked if c == "random")
        print(f"  50%, {domain:<13} best {best[1]:<13} KL {best[0]:.4f}   random {random_kl:.4f}   "
              f"worst {worst[1]:<13} {worst[0]:.4f}")


if __name__ == "__main__":
    main()
