"""Regenerate every generated section of docs/BENCHMARKS.md, one benchmark after another.

    python bench/run_all.py [--only capture export ...] [--llmc-python /work/venv-llmc/bin/python]

Each benchmark runs in its own process with `--write`. On a shared machine run this when it is
otherwise idle, or read the ratios rather than the absolute times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commands(llmc_python: str) -> dict[str, list[str]]:
    return {
        "capture": ["capture_overhead.py", "--sweep"],
        "capture-config": ["capture_overhead.py", "--config", "100m", "--reps", "5"],
        "export": ["export.py"],
        "store-write": ["store_write.py"],
        "dashboard": ["dashboard.py", "--browser"],
        "plan-eval-100m": ["plan_eval.py", "--config", "100m", "--tokens", "4096", "--reps", "3"],
        "plan-eval-demo": ["plan_eval.py", "--reps", "3"],
        "peer": ["peer_llmcompressor.py", "all", "--llmc-python", llmc_python],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="run only these (names: see commands())")
    parser.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    for name, (script, *rest) in commands(args.llmc_python).items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *rest, "--write"], check=True, env=env)


if __name__ == "__main__":
    main()
