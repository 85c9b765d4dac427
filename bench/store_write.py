"""The DuckDB write of one big capture run: 94 layers x 512 experts, top-8, every expert pair.

    python bench/store_write.py [--reps 3] [--write]

A real 94 x 512 top-8 capture over ~200k tokens routes each token to 8 experts, i.e. 28 pairs
per token and layer, so nearly every one of the 130,816 pairs per layer is seen: 12.3M
co-activation rows per run. Per repetition, in a fresh store: `complete_run` of a new run
(first capture), then of a second run with the same settings (a re-capture: the first run's
rows are deleted in the same transaction), then one layer's co-activation query; and, in
another fresh store, the floor: a bare DuckDB connection inserting the same three frames
(`INSERT ... SELECT ? AS run_id, * FROM frame`) in one transaction and closing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchlib import machine, spread, table, write_section
from moe_viz import store

LAYERS, EXPERTS, TOP_K, TOKENS = 94, 512, 8, 200_000


def synthetic_run(seed: int) -> dict[str, pd.DataFrame]:
    """Expert, layer and co-activation frames shaped like a real capture of this size (dense pairs)."""
    rng = np.random.default_rng(seed)
    a, b = np.triu_indices(EXPERTS, 1)
    pairs = a.size
    routed = rng.poisson(TOKENS * TOP_K / EXPERTS, LAYERS * EXPERTS).astype("int64")
    experts = pd.DataFrame({
        "layer": np.repeat(np.arange(LAYERS), EXPERTS), "expert": np.tile(np.arange(EXPERTS), LAYERS),
        "routed_tokens": routed, "top1_tokens": routed // 3, "top1_prob_sum": routed * 0.2,
        "gate_sum": routed * 0.15, "prob_sum": routed * 0.12 + 1.0, "ean_sum": routed * rng.uniform(1, 5, routed.size),
        "ean_sq_sum": routed * 9.0, "ean_max": rng.uniform(3, 9, routed.size),
        "reap_sum": routed * rng.uniform(0.1, 1, routed.size), "contribution_sum": routed * 0.05,
    })
    layers = pd.DataFrame({"layer": np.arange(LAYERS), "module": [f"model.layers.{l}.mlp" for l in range(LAYERS)],
                           "tokens": TOKENS, "num_experts": EXPERTS, "top_k": TOP_K, "router_score": "softmax",
                           "entropy_mean": rng.uniform(3, 6, LAYERS)})
    coactivation = pd.DataFrame({
        "layer": np.repeat(np.arange(LAYERS, dtype="int32"), pairs),
        "expert_a": np.tile(a.astype("int32"), LAYERS), "expert_b": np.tile(b.astype("int32"), LAYERS),
        # E[count] = T * C(k,2) / C(E,2) ~ 43: nearly every pair is seen at least once
        "tokens": rng.poisson(TOKENS * TOP_K * (TOP_K - 1) / (EXPERTS * (EXPERTS - 1)), LAYERS * pairs).astype("int64"),
    })
    coactivation = coactivation[coactivation.tokens > 0].reset_index(drop=True)
    return {"expert_stats": experts, "layer_stats": layers, "coactivation": coactivation}


def write_run(path: Path, frames: dict[str, pd.DataFrame]) -> tuple[tuple[float, float], str]:
    """((wall s, CPU s) of complete_run, run id)."""
    run_id = store.begin_run(path, model_id="synthetic-94x512", model_fingerprint="synthetic", model_type="qwen3_moe",
                             domain="bench", source="synthetic", settings={}, tool_version="bench")
    start, start_cpu = time.perf_counter(), time.process_time()
    store.complete_run(path, run_id, expert_stats=frames["expert_stats"], layer_stats=frames["layer_stats"],
                       coactivation=frames["coactivation"], tokens=TOKENS, sequences=400)
    return (time.perf_counter() - start, time.process_time() - start_cpu), run_id


def bare_insert(path: Path, frames: dict[str, pd.DataFrame]) -> tuple[float, float]:
    """(wall s, CPU s) of the same rows through one bare DuckDB connection: open, insert, commit, close."""
    start, start_cpu = time.perf_counter(), time.process_time()
    con = store.duckdb.connect(str(path), config={"threads": store.duckdb_threads()})
    con.execute("BEGIN TRANSACTION")
    for table, frame in frames.items():
        con.register("frame", frame)
        con.execute(f"INSERT INTO {table} BY NAME SELECT 'bare' AS run_id, * FROM frame")
        con.unregister("frame")
    con.execute("COMMIT")
    con.close()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    frames = synthetic_run(0)
    first, again, bare, query = [], [], [], []
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="moe_viz_store_write_") as tmp:
            for name in ("bare.duckdb", "store.duckdb"):
                with store.connect(Path(tmp) / name):
                    pass  # schema created outside the timing
            bare.append(bare_insert(Path(tmp) / "bare.duckdb", frames))
            path = Path(tmp) / "store.duckdb"
            seconds, _ = write_run(path, frames)
            first.append(seconds)
            seconds, run_id = write_run(path, frames)
            again.append(seconds)
            start = time.perf_counter()
            pairs = store.coactivation(path, run_id, LAYERS // 2)
            query.append((time.perf_counter() - start) * 1000)
            assert len(pairs) == (frames["coactivation"].layer == LAYERS // 2).sum()

    def cells(values):
        return [spread([w for w, _ in values], "{:.2f}"), spread([c for _, c in values], "{:.2f}")]

    rows = [["bare DuckDB: open, insert the three frames, commit, close (the floor)", *cells(bare)],
            ["first capture: `complete_run`", *cells(first)],
            ["re-capture: `complete_run` replacing the first run", *cells(again)],
            ["one layer's co-activation query (ms)", spread(query, "{:.0f}"), ""]]
    body = "\n".join([
        f"{len(frames['coactivation']):,} co-activation rows, {len(frames['expert_stats']):,} expert rows; "
        f"{args.reps} repetitions, each in fresh stores (schema created before the timing), bare insert first; "
        f"DuckDB {store.duckdb.__version__} with {store.duckdb_threads()} thread(s) per process; wall and process "
        "CPU seconds, median (min–max, n).", "",
        table(["what", "wall s", "CPU s"], rows), "",
        "The co-activation table has no index on (run_id, layer) (dropped in schema v5: it made the first write "
        "and the re-capture's delete several times slower), and `complete_run` lets the INSERT add the run_id "
        "column instead of building it in the 12.3M-row frame first.", "",
        f"Machine: {machine()}.",
    ])
    print(body)
    if args.write:
        write_section("store-write", body)


if __name__ == "__main__":
    main()
