"""Regenerate every generated section of docs/BENCHMARKS.md, one benchmark after another.

    python bench/run_all.py [--only capture export ...] [--llmc-python /work/venv-llmc/bin/python] [--list]

Each benchmark runs in its own process with `--write`. On a shared machine run this when it is
otherwise idle, or read the ratios rather than the absolute times. `--list` prints the commands
and the sections each one writes, and runs nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCALE_DIR = "/tmp/moe_viz_capture_scale"


def commands(llmc_python: str) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (script and arguments, the docs/BENCHMARKS.md sections it writes with --write)."""
    return {
        # a one-forward capture's cost beyond the forwards, step by step (~2 min)
        "capture-fixed": (["capture_overhead.py", "--fixed", "--reps", "6"], ["capture-fixed"]),
        # the observer per forward against bare forwards and the same kernels, rounds of three, 95% interval (~5 min)
        "capture-paired": (["capture_overhead.py", "--paired", "--pairs", "36"], ["capture-paired"]),
        # the sweep over experts and tokens: whole captures against the same forwards bare and plain (~27 min)
        "capture-paired-end-to-end": (["capture_overhead.py", "--paired-capture", "--tokens", "2048", "8192", "32768",
                                       "--capture-rounds", "30", "12", "6"], ["capture-paired-end-to-end"]),
        # a calibration-sized capture (the default is 200,000 tokens per domain) against its bare forwards (~40 min)
        "capture-paired-end-to-end-128k": (["capture_overhead.py", "--paired-capture", "--tokens", "131072",
                                            "--capture-rounds", "6", "--without-plain"],
                                           ["capture-paired-end-to-end-128k"]),
        "capture-config": (["capture_overhead.py", "--config", "100m", "--reps", "5"], ["capture-config-100m"]),
        "capture-config-512e": (["capture_overhead.py", "--config", "512e", "--reps", "11", "--skip-dense"],
                                ["capture-config-512e"]),
        "export": (["export.py"], ["export"]),
        "store-write": (["store_write.py"], ["store-write"]),
        "dashboard": (["dashboard.py", "--browser"], ["dashboard"]),
        # against this checkout itself: the absolute page-change time is the figure (earlier references: see the doc)
        "heatmap-page": (["heatmap_page.py", "--reference", str(HERE.parent), "--reps", "7"], ["heatmap-page"]),
        "plan-eval-100m": (["plan_eval.py", "--config", "100m", "--tokens", "4096", "--reps", "3"], ["plan-eval-100m"]),
        "plan-eval-demo": (["plan_eval.py", "--reps", "3"], ["plan-eval-demo"]),
        "sweep-demo": (["sweep_demo.py", "--reps", "2"], ["sweep-demo"]),
        "search-demo": (["search_demo.py"], ["search-demo"]),
        "store-contention": (["store_contention.py", "--rounds", "5"], ["store-contention"]),
        "token-trace-overhead": (["token_trace.py", "overhead", "--max-tokens", "200000", "--reps", "4"],
                                 ["token-trace-overhead-200000"]),
        "token-trace-queries": (["token_trace.py", "queries", "--reps", "7"], ["token-trace-queries"]),
        "peer": (["peer_llmcompressor.py", "all", "--llmc-python", llmc_python, "--reps", "3"], ["peer-llmcompressor"]),
        # checkpoints and stores under /tmp/moe_viz_capture_scale (memory writes ~4.5 GB; delete it afterwards)
        "capture-scale-memory": (["capture_scale.py", "memory", "--dir", SCALE_DIR, "--reps", "2"],
                                 ["capture-scale-memory"]),
        "capture-scale-throughput": (["capture_scale.py", "throughput", "--dir", SCALE_DIR, "--reps", "3"],
                                     ["capture-scale-throughput"]),
        "capture-scale-ranks": (["capture_scale.py", "ranks", "--dir", SCALE_DIR, "--reps", "5"],
                                ["capture-scale-ranks"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="run only these (names: see --list)")
    parser.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    parser.add_argument("--list", action="store_true", help="print the commands and their sections, run nothing")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for name, ((script, *rest), sections) in commands(args.llmc_python).items():
        if args.only and name not in args.only:
            continue
        command = [sys.executable, str(HERE / script), *rest, "--write"]
        print(f"== {name} -> {', '.join(sections)}: {' '.join(command[1:])}", flush=True)
        if args.list:
            continue
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
