"""Do writers starve behind readers? A capture alone vs with two processes reading the store in a tight loop.

    python bench/store_contention.py [--rounds 5] [--tokens 4000] [--commits 20] [--write]

Two workloads, each timed in interleaved rounds (one of each condition per round,
so a change in the machine's load hits all conditions alike):

- capture: `capture_model` of the shipped demo model on the four built-in domains
  (a begin_run and a complete_run per domain, forward passes in between);
- commits: a begin_run + complete_run sequence of 48-layer x 128-expert runs (writes only).

Conditions:
- solo: nothing else touches the machine's CPUs on our behalf;
- readers: two processes run `list_runs` + `expert_stats` of two runs in a loop
  without pause (a dashboard that never sleeps);
- burners: two processes spin on the CPU without touching the store. On a machine
  with few cores the readers slow the capture down by taking CPU time as well as by
  holding the file; burners measure the CPU part alone.

Prints the median time of each condition, the ratios readers/solo (the target:
<= 1.5) and readers/burners (what the store's locking adds on top of CPU sharing),
the time the workload spent opening the store (waiting for locks, median per
condition: the starvation itself, whatever the CPUs do), and the reads per
second the readers managed (they must not starve either).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Each helper restores Python's own SIGINT handler: a benchmark started in the background (`cmd &`,
# nohup) inherits SIGINT ignored, and its helpers would then loop on after the signal that stops them.
READER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from moe_viz import store
path = sys.argv[1]
reads = 0
print("ready", flush=True)
start = time.perf_counter()
try:
    while True:
        runs = store.list_runs(path, status="complete")
        store.expert_stats(path, runs.run_id.tolist()[:2])
        reads += 1
except BaseException:  # SIGINT ends the loop (it may surface from inside DuckDB as its own exception)
    print(reads / (time.perf_counter() - start), flush=True)
"""

BURNER = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
print("ready", flush=True)
try:
    while True:
        pass
except KeyboardInterrupt:
    print(0.0, flush=True)
"""


class Background:
    """Two helper processes; started before the timed section, stopped after it."""

    def __init__(self, kind: str, store_path: Path):
        self.procs = []
        if kind == "solo":
            return
        script = READER if kind == "readers" else BURNER
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        for _ in range(2):
            self.procs.append(subprocess.Popen([sys.executable, "-c", script, str(store_path)], env=env,
                                               stdout=subprocess.PIPE, text=True))
        for proc in self.procs:
            assert proc.stdout.readline().strip() == "ready"  # handshake: it is about to loop

    def stop(self) -> list[float]:
        rates = []
        for proc in self.procs:
            proc.send_signal(2)  # SIGINT: the loop prints its rate and exits
            out, _ = proc.communicate(timeout=120)
            rates.append(float(out.strip() or "nan"))
        return rates


def synthetic_frames(rng: np.random.Generator, layers: int = 48, experts: int = 128, top_k: int = 8):
    routed = rng.poisson(200, size=layers * experts).astype("int64")
    expert_df = pd.DataFrame({
        "layer": np.repeat(np.arange(layers), experts), "expert": np.tile(np.arange(experts), layers),
        "routed_tokens": routed, "top1_tokens": routed // 3, "top1_prob_sum": routed * 0.2, "gate_sum": routed * 0.1,
        "prob_sum": routed * 0.1, "ean_sum": routed * 2.0, "ean_sq_sum": routed * 5.0, "ean_max": 3.0,
        "reap_sum": routed * 0.5, "contribution_sum": routed * 0.05,
    })
    layer_df = pd.DataFrame({"layer": np.arange(layers), "module": [f"model.layers.{l}.mlp" for l in range(layers)],
                             "tokens": 4000, "num_experts": experts, "top_k": top_k, "router_score": "softmax",
                             "entropy_mean": 3.0})
    a, b = np.triu_indices(experts, 1)
    keep = rng.random(a.size) < 0.3
    coact = pd.DataFrame({"layer": np.repeat(np.arange(layers), keep.sum()),
                          "expert_a": np.tile(a[keep], layers), "expert_b": np.tile(b[keep], layers), "tokens": 1})
    return expert_df, layer_df, coact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4000, help="tokens per domain in the capture workload")
    parser.add_argument("--commits", type=int, default=20, help="runs written by the commits workload")
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_viz import store
    from moe_viz.capture.run import CaptureSettings, capture_model
    from moe_viz.demo import shipped_model
    from moe_viz.capture.sources import read_documents

    torch.set_num_threads(1)  # see docs/BENCHMARKS.md: 2 threads are slower on these 2-core VMs
    model_dir = shipped_model()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = [read_documents(name, f"builtin:{name}") for name in ("code", "math", "prose", "json")]
    settings = CaptureSettings(max_tokens=args.tokens, seq_len=128, batch_size=8)
    frames = synthetic_frames(np.random.default_rng(0))

    def capture_workload(path: Path) -> None:
        capture_model(model, tokenizer, "demo", docs, settings, store_path=path, progress=None)

    def commits_workload(path: Path) -> None:
        for i in range(args.commits):
            run_id = store.begin_run(path, model_id="synthetic", model_fingerprint="x", model_type="qwen3_moe",
                                     domain=f"d{i % 4}", source="synthetic", settings={}, tool_version="bench")
            store.complete_run(path, run_id, expert_stats=frames[0], layer_stats=frames[1], coactivation=frames[2],
                               tokens=4000, sequences=32)

    opening = [0.0]  # seconds spent in store.connect before the connection was handed over
    plain_connect = store.connect

    @contextmanager
    def timed_connect(*a, **kw):
        start = time.perf_counter()
        with plain_connect(*a, **kw) as con:
            opening[0] += time.perf_counter() - start
            yield con

    store.connect = timed_connect  # store's own functions look `connect` up in the module

    workloads = {"capture": capture_workload, "commits": commits_workload}
    conditions = ("solo", "readers", "burners")
    times = {(w, c): [] for w in workloads for c in conditions}
    waits = {(w, c): [] for w in workloads for c in conditions}
    rates = {w: [] for w in workloads}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.duckdb"
        capture_workload(path)  # the readers have runs to read from the start; warms everything up
        for r in range(args.rounds):
            for name, workload in workloads.items():
                for condition in conditions:
                    helpers = Background(condition, path)
                    opening[0] = 0.0
                    start = time.perf_counter()
                    workload(path)
                    times[name, condition].append(time.perf_counter() - start)
                    waits[name, condition].append(opening[0])
                    got = helpers.stop()
                    if condition == "readers":
                        rates[name] += got
            print(f"round {r + 1}: " + ", ".join(f"{w}/{c} {times[w, c][-1]:.2f}s" for w in workloads for c in conditions),
                  flush=True)
    from benchlib import machine, ratios, spread, table, write_section

    rows = []
    for name in workloads:
        per_round = ratios(times[name, "readers"], times[name, "solo"])
        rows.append([name, *(spread(times[name, c], "{:.2f}") for c in conditions), spread(per_round, "{:.2f}"),
                     spread(ratios(times[name, "burners"], times[name, "solo"]), "{:.2f}"),
                     " / ".join(f"{statistics.median(waits[name, c]):.2f}" for c in ("solo", "readers")),
                     spread(rates[name], "{:.1f}") if rates[name] else ""])
    body = "\n".join([
        f"`capture` = `capture_model` of the shipped demo model on 4 built-in domains, {args.tokens:,} tokens each; "
        f"`commits` = {args.commits} `begin_run` + `complete_run` of synthetic 48-layer × 128-expert runs. Conditions "
        f"interleaved per round, {args.rounds} rounds after one warm-up capture; wall seconds (waiting for the lock "
        "is the point), median (min–max, n); ratios per round; 1 torch thread, DuckDB "
        f"{store.duckdb_threads()} thread(s) per process.", "",
        table(["workload", "solo (s)", "+ 2 readers (s)", "+ 2 burners (s)", "readers / solo", "burners / solo",
               "opening the store, solo / readers (s, median)", "reads/s per reader"], rows), "",
        f"Machine: {machine(1)}."])
    print(body)
    if args.write:
        write_section("store-contention", body)


if __name__ == "__main__":
    main()
