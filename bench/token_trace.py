"""Token-level traces: what recording them adds to a capture, and how fast the views query them.

    python bench/token_trace.py overhead [--max-tokens 200000] [--reps 5]
    python bench/token_trace.py queries [--domains 10 --tokens 4096 --layers 94 --experts 128 --top-k 8] [--reps 5]

overhead: the whole `capture_model` (forward passes, statistics, the store commit) on the shipped
demo model and its built-in code domain, with `trace_tokens=0` and with the default N, in interleaved
repetitions (each into a fresh store); reports the median of the per-repetition ratios and their spread.

queries: builds a store whose runs carry a synthetic trace of the given size (token ids Zipf-like over a
32k vocabulary, k distinct experts per token and layer, Dirichlet gates), written through
`store.complete_run` like a capture (the commit time is reported too), then times every view of the
Expert detail and Token routes pages on it, each opening the store afresh as the dashboard does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def overhead(args: argparse.Namespace) -> None:
    from moe_viz.capture.run import CaptureSettings, capture_model
    from moe_viz.capture.sources import read_documents
    from moe_viz.capture.trace import DEFAULT_TRACE_TOKENS
    from moe_viz.demo import SHIPPED_MODEL
    from moe_viz.models.loading import load_model

    model, tokenizer = load_model(str(SHIPPED_MODEL), device="cpu", dtype="fp32")
    docs = read_documents("code", "builtin:code")
    wall: dict[int, list[float]] = {0: [], DEFAULT_TRACE_TOKENS: []}
    cpu: dict[int, list[float]] = {0: [], DEFAULT_TRACE_TOKENS: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps + 1):  # the first repetition warms up and is not counted
            order = [0, DEFAULT_TRACE_TOKENS] if rep % 2 == 0 else [DEFAULT_TRACE_TOKENS, 0]
            for n in order:
                settings = CaptureSettings(max_tokens=args.max_tokens, seq_len=512, batch_size=8, trace_tokens=n)
                start, start_cpu = time.perf_counter(), time.process_time()
                capture_model(model, tokenizer, "demo", [docs], settings, store_path=Path(tmp) / f"{rep}-{n}.duckdb",
                              progress=lambda p: None)
                if rep:
                    wall[n].append(time.perf_counter() - start)
                    cpu[n].append(time.process_time() - start_cpu)
    from benchlib import machine, ratios, spread, table, write_section

    rows = []
    for name, times in (("CPU time (s)", cpu), ("wall time (s)", wall)):
        rows.append([name, spread(times[0], "{:.2f}"), spread(times[DEFAULT_TRACE_TOKENS], "{:.2f}"),
                     spread(ratios(times[DEFAULT_TRACE_TOKENS], times[0]), "{:.3f}")])
    body = "\n".join([
        f"`capture_model` of the shipped demo model (4 MoE layers, 8 experts, top-2) on `builtin:code`, "
        f"{args.max_tokens:,} tokens, `trace_tokens=0` vs `{DEFAULT_TRACE_TOKENS}` (the default), order alternating, "
        f"each into a fresh store; {args.reps} repetitions after one warm-up; process CPU time (all threads) and wall "
        "time; median (min–max, n) and the per-repetition ratio.", "",
        table(["", "trace 0", f"trace {DEFAULT_TRACE_TOKENS}", "ratio"], rows), "",
        f"Machine: {machine(1)}."])
    print(body)
    if args.write:
        write_section(f"token-trace-overhead-{args.max_tokens}", body)


def synthetic_trace(rng: np.random.Generator, tokens: int, layers: int, experts: int, k: int, seq_len: int = 512):
    """Frames shaped like `TokenTracer.frames()`: (seq, pos) in order, layer-major routes."""
    from moe_viz.capture.trace import gate_ranks

    vocab = 32_000
    ids = np.minimum(rng.zipf(1.2, tokens), vocab) - 1
    seq = np.arange(tokens) // seq_len
    pos = np.arange(tokens) % seq_len
    blocks = []
    for layer in range(layers):
        chosen = np.argpartition(rng.random((tokens, experts), dtype=np.float32), k, axis=1)[:, :k]
        gates = rng.dirichlet(np.ones(k), size=tokens).astype(np.float32)
        blocks.append(pd.DataFrame({
            "seq": np.repeat(seq, k).astype(np.int32), "pos": np.repeat(pos, k).astype(np.int32),
            "token_id": np.repeat(ids, k).astype(np.int32), "layer": np.int16(layer),
            "slot": np.tile(np.arange(k, dtype=np.int16), tokens), "expert": chosen.reshape(-1).astype(np.int16),
            "gate": gates.reshape(-1), "gate_rank": gate_ranks(gates).reshape(-1)}))
    run_tokens = pd.DataFrame({"seq": seq.astype(np.int32), "pos": pos.astype(np.int32), "token_id": ids.astype(np.int32)})
    distinct = np.unique(ids)
    pieces = pd.DataFrame({"token_id": distinct.astype(np.int32), "piece": [f"tok{i}" for i in distinct]})
    return {"token_routes": pd.concat(blocks, ignore_index=True), "run_tokens": run_tokens, "token_pieces": pieces}


def build_store(path: Path, args: argparse.Namespace) -> list[str]:
    from moe_viz import store

    rng = np.random.default_rng(0)
    run_ids, commits = [], []
    empty = pd.DataFrame({"layer": pd.Series([], dtype=int)})
    for d in range(args.domains):
        frames = synthetic_trace(rng, args.tokens, args.layers, args.experts, args.top_k)
        run_id = store.begin_run(path, model_id="synthetic", model_fingerprint="f", model_type="t", domain=f"d{d}",
                                 source="s", settings={}, tool_version="bench")
        start = time.perf_counter()
        store.complete_run(path, run_id, expert_stats=empty, layer_stats=empty, coactivation=empty, tokens=args.tokens,
                           sequences=1, trace=frames)
        commits.append(time.perf_counter() - start)
        run_ids.append(run_id)
    rows = args.domains * args.tokens * args.layers * args.top_k
    from benchlib import spread

    built = (f"{rows:,} `token_routes` rows ({args.domains} domains × {args.tokens:,} tokens × {args.layers} layers × "
             f"top-{args.top_k}, {args.experts} experts), {path.stat().st_size / 2**20:.0f} MiB; `complete_run` of one "
             f"domain's {rows // args.domains:,} rows: {spread(commits, '{:.2f}')} s wall")
    print(built)
    (path.parent / (path.name + ".built")).write_text(built)
    return run_ids


def queries(args: argparse.Namespace) -> None:
    from moe_viz import store
    from moe_viz.analysis import token_profiles as tp

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.store) if args.store else Path(tmp) / "trace.duckdb"
        if path.exists():  # a store this benchmark built before (--store): reuse it
            run_ids = store.list_runs(path).sort_values("domain").run_id.tolist()
        else:
            run_ids = build_store(path, args)
        a, b = tp.TraceSource(path, run_ids[len(run_ids) // 2]), tp.TraceSource(path, run_ids[-1])
        layer = args.layers // 2
        kept = {l: list(range(args.experts // 2)) for l in range(args.layers)}
        num = {l: args.experts for l in range(args.layers)}
        views = {  # what one page render asks for
            "has_trace": lambda: tp.has_trace(a),
            "expert_tokens (profile)": lambda: tp.expert_tokens(a, layer, 5),
            "example_contexts": lambda: tp.example_contexts(a, layer, 5, None, 8, 10),
            "domain_differences": lambda: tp.domain_differences(a, b, layer),
            "trace_sequences": lambda: tp.trace_sequences(a),
            "token_window (64 tokens)": lambda: tp.token_window(a, 3, 100, 64),
            "tokens_hurt (whole trace)": lambda: tp.tokens_hurt(a, kept, num, 20),
            "context_dependence (all layers)": lambda: tp.context_dependence(a),
            "context_dependent_tokens": lambda: tp.context_dependent_tokens(a, layer, 20),
        }
        wall = {name: [] for name in views}
        cpu = {name: [] for name in views}
        for _ in range(args.reps + 1):  # interleaved; the first round warms the OS cache and is not counted
            for name, view in views.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                view()
                wall[name].append(1000 * (time.perf_counter() - start))
                cpu[name].append(1000 * (time.process_time() - start_cpu))
        from benchlib import machine, spread, table, write_section

        built = path.parent / (path.name + ".built")
        rows = [[name, spread(cpu[name][1:], "{:.1f}"), spread(wall[name][1:], "{:.1f}")] for name in views]
        body = "\n".join([
            (built.read_text() if built.exists() else f"store {path}") + ". Each view opens the store afresh, as the "
            f"dashboard does; views interleaved, {args.reps} repetitions after one warm-up round; DuckDB "
            f"{store.duckdb_threads()} thread(s) per process. CPU = this process's CPU time (all its threads): what "
            "the view costs on an otherwise idle core; wall includes waiting for the CPU.", "",
            table(["view", "CPU ms: median (min–max)", "wall ms: median (min–max)"], rows), "",
            f"Machine: {machine()}."])
        print(body)
        if args.write:
            write_section("token-trace-queries", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("overhead")
    p.add_argument("--max-tokens", type=int, default=200_000)
    p.add_argument("--reps", type=int, default=5)
    p = commands.add_parser("queries")
    p.add_argument("--domains", type=int, default=10)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=94)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--store", default=None, help="build the synthetic store here and keep it (reused if present)")
    for p in commands.choices.values():
        p.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overhead(args) if args.command == "overhead" else queries(args)


if __name__ == "__main__":
    main()
