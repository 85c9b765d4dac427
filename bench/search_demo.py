"""Does the plan search beat the best single criterion? The shipped demo model at 50% sparsity.

    python bench/search_demo.py [--write]            # capture the demo into a temporary store, 1 thread
    python bench/search_demo.py --store S.duckdb     # a store already holding the demo captures

Per built-in domain D: `moe-viz search --domain D --keep 4` (seeds: every criterion's plan
calibrated on D, `random` included, and the Lu et al. enumeration plan; fitness = KL on the
first half of D's held-out split), then the held-out KL (second half, seen by neither the
search nor the enumeration) of every seed plan and of the search's plan. "Best criterion" is
the criterion with the lowest held-out KL: chosen in hindsight, the strongest baseline. Then
all five domains mixed, uniform and nonuniform (same total, evaluation only). KL values are
deterministic under the seed; each search is timed once (wall and process CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchlib import machine, write_section
from moe_viz import demo
from moe_viz.cli import main as moe_viz_main
from moe_viz.demo.corpora import DOMAINS


def search(store: str, domains: list[str], args, mode: str = "uniform") -> tuple[dict, str]:
    argv = ["search", "--model", str(demo.shipped_model()), "--store", store, "--keep", "4", "--mode", mode,
            "--generations", str(args.generations), "--population", str(args.population), "--seed", str(args.seed),
            "--device", "cpu", "--dtype", "fp32", "--json"]
    for domain in domains:
        argv += ["--domain", domain]
    out, err = io.StringIO(), io.StringIO()
    started, started_cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = moe_viz_main(argv)
    if code:
        raise SystemExit(f"moe-viz search failed ({code}): {err.getvalue()[-2000:]}")
    return json.loads(out.getvalue()), f"{time.perf_counter() - started:.0f} / {time.process_time() - started_cpu:.0f} s"


def mean_kl(results: list[dict]) -> float:
    return statistics.fmean(r["kl"] for r in results)


def criteria_only(report: dict) -> list[dict]:
    return [s for s in report["seeds"] if s["name"] != "enumeration"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store with the demo captures (default: capture into a temp one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lines: list[str] = []
    out = lines.append
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or str(Path(tmp) / "demo.duckdb")
        with contextlib.redirect_stderr(io.StringIO()):
            demo.prepare(store)
        out(f"Demo model, keep 4 of 8 experts per layer (sparsity 0.5), {args.threads} torch thread(s), "
            f"generations {args.generations}, population {args.population}, seed {args.seed}; KL deterministic under "
            "the seed; each search run once (n=1), its wall / process CPU seconds in the last column.")
        out("\nCalibrated and searched on one domain (KL on that domain's held-out half):\n")
        out("| domain | best criterion (held-out) | its KL | best seed by search fitness | its KL | enumeration KL "
            "| search KL | search vs best criterion | plans evaluated | time (wall / CPU) |")
        out("|---|---|---|---|---|---|---|---|---|---|")
        for domain in DOMAINS:
            report, seconds = search(store, [domain], args)
            best = min(criteria_only(report), key=lambda s: mean_kl(s["results"]))
            picked = next(s for s in report["seeds"] if s["name"] == report["best_seed"])
            enumeration = next(s for s in report["seeds"] if s["name"] == "enumeration")
            ours, theirs = mean_kl(report["results"]), mean_kl(best["results"])
            out(f"| {domain} | {best['name']} | {theirs:.4f} | {picked['name']} | {mean_kl(picked['results']):.4f} "
                f"| {mean_kl(enumeration['results']):.4f} | **{ours:.4f}** | {(ours / theirs - 1) * 100:+.0f}% "
                f"| {report['evaluations']} | {seconds} |")

        everything = list(DOMAINS)
        out(f"\nAll {len(everything)} domains mixed (equal weights; fitness = mean of the domains' KL); held-out KL "
            "per domain and mean:\n")
        out("| plan | " + " | ".join(everything) + " | mean | plans evaluated | time (wall / CPU) |")
        out("|---|" + "---|" * (len(everything) + 3))
        rows = []
        for mode in ("uniform", "nonuniform"):
            report, seconds = search(store, everything, args, mode)
            if mode == "uniform":
                best = min(criteria_only(report), key=lambda s: mean_kl(s["results"]))
                enumeration = next(s for s in report["seeds"] if s["name"] == "enumeration")
                rows.append((f"best criterion: {best['name']}", best["results"], "", ""))
                rows.append(("enumeration (Lu et al.)", enumeration["results"], "", ""))
            counts = [len(report["plan"]["kept"][k]) for k in sorted(report["plan"]["kept"], key=int)]
            label = f"search, {mode}" + ("" if mode == "uniform" else f" (kept per layer {counts})")
            rows.append((label, report["results"], report["evaluations"], seconds))
        for label, results, evaluations, seconds in rows:
            out(f"| {label} | " + " | ".join(f"{r['kl']:.4f}" for r in results)
                + f" | {mean_kl(results):.4f} | {evaluations} | {seconds} |")
    out(f"\nThe whole script, demo capture included: {time.perf_counter() - started:.0f} s wall. "
        f"Machine: {machine(args.threads)}.")
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section("search-demo", body)


if __name__ == "__main__":
    main()
