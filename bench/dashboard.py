"""Dashboard data queries on a synthetic big store: 94 layers x 512 experts x 10 domains.

    python bench/dashboard.py [--store /tmp/moe_viz_bench_dashboard.duckdb] [--browser] [--write]

The store holds what 10 real captures of a 94-layer x 512-expert top-8 model would: per run
48,128 expert rows and every expert pair of every layer (12.3M co-activation rows, as dense as
a real ~200k-token capture; bench/store_write.py). Times each view's store query (what a page
asks DuckDB for) and the analysis computed from it, median (min–max) of 5 calls that open and
close the store as the dashboard does, and with --browser the page changes in headless
Chromium (from the click in the sidebar until the page's main chart is drawn).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchlib import SCRIPT_DONE, back_to_runs, machine, spread, table, write_section
from store_write import synthetic_run
from moe_viz.analysis import tables, criteria, domain_stats
from moe_viz import store
from moe_viz.prune.plan import build_plan, preview

LAYERS, EXPERTS, DOMAINS, TOP_K = 94, 512, 10, 8


def build_store(path: Path) -> None:
    rng = np.random.default_rng(0)
    layer_index = np.repeat(np.arange(LAYERS), EXPERTS)
    expert_index = np.tile(np.arange(EXPERTS), LAYERS)
    for d in range(DOMAINS):
        routed = rng.poisson(rng.gamma(0.6, 400, size=LAYERS * EXPERTS)).astype("int64")
        experts = pd.DataFrame({
            "layer": layer_index, "expert": expert_index, "routed_tokens": routed, "top1_tokens": routed // 3,
            "top1_prob_sum": routed * 0.2, "gate_sum": routed * 0.15, "prob_sum": routed * 0.12 + 1.0,
            "ean_sum": routed * rng.uniform(1, 5, routed.size), "ean_sq_sum": routed * 9.0, "ean_max": rng.uniform(3, 9, routed.size),
            "reap_sum": routed * rng.uniform(0.1, 1, routed.size), "contribution_sum": routed * 0.05,
        })
        layers = pd.DataFrame({"layer": np.arange(LAYERS), "module": [f"model.layers.{l}.mlp" for l in range(LAYERS)],
                               "tokens": 200_000, "num_experts": EXPERTS, "top_k": TOP_K, "router_score": "softmax",
                               "entropy_mean": rng.uniform(3, 6, LAYERS)})
        pairs = synthetic_run(d)["coactivation"]  # every pair of every layer, counts ~ Poisson(43)
        run_id = store.begin_run(path, model_id="synthetic-94x512", model_fingerprint="synthetic", model_type="qwen3_moe",
                                 domain=f"domain{d}", source="synthetic", settings={}, tool_version="bench")
        store.complete_run(path, run_id, expert_stats=experts, layer_stats=layers, coactivation=pairs,
                           tokens=200_000, sequences=400)


class Timing:
    """Wall and process CPU milliseconds of repeated calls (DuckDB runs 1 thread per process here, in this
    process: its CPU time is what the query costs on an otherwise idle core; wall adds waiting for a CPU)."""

    def __init__(self, fn, reps: int = 5):
        self.wall, self.cpu = [], []
        for _ in range(reps):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            self.wall.append((time.perf_counter() - start) * 1000)
            self.cpu.append((time.process_time() - start_cpu) * 1000)

    def cells(self) -> list[str]:
        return [spread(self.cpu, "{:.0f}"), spread(self.wall, "{:.0f}")]


def timed(fn, reps: int = 5) -> Timing:
    return Timing(fn, reps)


def verdict(values: list[float], target: float) -> str:
    """Whether the median meets the target; the median, not the worst repetition, is what the target means."""
    return "yes" if statistics.median(values) < target else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/moe_viz_bench_dashboard.duckdb")
    parser.add_argument("--browser", action="store_true")
    parser.add_argument("--visits", type=int, default=4, help="page changes per page with --browser (the first is "
                        "reported apart)")
    parser.add_argument("--write", action="store_true", help="update the marked section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    path = Path(args.store)
    if not path.exists():
        build_store(path)
    runs = store.list_runs(path)
    ids = runs.run_id.tolist()
    one = ids[:1]
    stats_all = store.expert_stats(path, ids)
    layers_all = store.layer_stats(path, ids)
    stats_one = stats_all[stats_all.run_id == one[0]]
    reap_columns = tables.metric_columns("reap")
    pairs_40 = store.coactivation(path, one[0], 40)
    rows = [  # (view: the store query it issues, ms, optional (computation on the result, ms))
        ("runs list (every page)", timed(lambda: store.list_runs(path)), None),
        ("heatmap: 1 domain, REAP columns", timed(lambda: store.expert_stats(path, one, reap_columns)),
         ("heatmap matrix", timed(lambda: tables.metric_matrix(tables.metric_values(stats_one, layers_all, "reap"), "domain0")))),
        ("difference heatmap: 2 domains", timed(lambda: store.expert_stats(path, ids[:2], reap_columns)), None),
        ("overlap: 10 domains, frequency columns", timed(lambda: store.expert_stats(path, ids, tables.metric_columns("frequency"))),
         ("top-k Jaccard, 10 domains", timed(lambda: domain_stats.topk_jaccard(
             tables.metric_values(stats_all, layers_all, "frequency").rename(columns={"value": "score"}), 8)))),
        ("overlap: 10 domains, REAP columns", timed(lambda: store.expert_stats(path, ids, reap_columns)),
         ("mutual information, 10 domains", timed(lambda: domain_stats.mutual_information(stats_all)))),
        ("health: layer_stats, 10 domains", timed(lambda: store.layer_stats(path, ids)),
         ("router health, 10 domains", timed(lambda: tables.router_health(stats_all, layers_all)))),
        ("expert detail: 10 domains, 1 layer", timed(lambda: store.expert_stats(path, ids, layer=40)),
         ("expert profile, 10 domains", timed(lambda: tables.expert_profile(stats_all, layers_all, 40, 7)))),
        ("expert detail: co-activation, 1 layer", timed(lambda: store.coactivation(path, one[0], 40)),
         ("partners of one expert", timed(lambda: tables.coactivation_partners(pairs_40, 1000, 7)))),
        ("rankings: 1 domain, all columns", timed(lambda: store.expert_stats(path, one)),
         ("criteria agreement, 94 layers", timed(lambda: tables.criteria_agreement(
             stats_one, [c for c in criteria.CRITERIA if c != "random"], 64), reps=3))),
        ("all columns, 10 domains (no view asks this)", timed(lambda: store.expert_stats(path, ids)), None),
        ("prune: plan (2-domain mix) + preview", timed(lambda: preview(build_plan(
            path, "synthetic-94x512", "reap", {"domain0": 1.0, "domain1": 0.5}, keep=256), path), reps=3), None),
    ]
    coact_rows = store.coactivation(path, one[0], 40).shape[0]
    lines = [[name, *ms.cells(), verdict(ms.cpu, 100) if not name.startswith("prune:") else "(a computation)"]
             for name, ms, _ in rows]
    computed = [[label, *ms.cells()] for _, _, derived in rows if derived for label, ms in [derived]]
    body = [f"{LAYERS} layers × {EXPERTS} experts × {DOMAINS} domains: {len(stats_all):,} expert rows, "
            f"{coact_rows:,} co-activation rows per layer and run. Milliseconds, median (min–max, n) of 5 calls "
            "(3 for the slowest), each opening (attaching) and closing the store as the dashboard does; CPU = this process's "
            "CPU time (DuckDB: 1 thread per process, in this process), what a call costs on an otherwise idle "
            "core; wall adds waiting for a CPU. Target: a view's query < 100 ms (judged on the CPU median).", "",
            table(["view: the store query it issues", "CPU ms", "wall ms", "< 100 ms"], lines), "",
            "Analysis computed from the query results (pandas/numpy in the page's process; cached per store version):",
            "", table(["computation", "CPU ms", "wall ms"], computed)]
    if args.browser:
        body += ["", browser_timings(path, args.visits)]
    body += ["", f"Machine: {machine()}."]
    print("\n".join(body))
    if args.write:
        write_section("dashboard", "\n".join(body))


def browser_timings(path: Path, visits: int) -> str:
    import shutil
    import socket
    import urllib.request

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(root / "app.py"), "--server.address",
                               "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
                               "--browser.gatherUsageStats", "false", "--", "--store", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.3)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=flags)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_selector('.js-plotly-plot .main-svg, [data-testid="stVegaLiteChart"] .marks', timeout=120_000)
            page.wait_for_timeout(8000)  # a user reading the first page: the app warms its imports meanwhile
            rows = []
            headings = {"Domain overlap": "Domain overlap", "Saliency rankings": "Saliency rankings",
                        "Expert detail": "Expert detail", "Router health": "Router health",
                        "Prune & export": "Prune & export", "Heatmaps": "Expert heatmaps"}
            for title, heading in headings.items():
                wall, cpu_server, cpu_browser = [], [], []
                for _ in range(visits):
                    start, server_start, browser_start = time.perf_counter(), cpu_of([server]), cpu_of(chromium())
                    page.get_by_role("link", name=title).click()
                    page.wait_for_function(  # the new page's heading is shown, the run is over, its chart drawn
                        "h => { const t = document.querySelector('h1');"
                        " return t && t.innerText.trim() === h"
                        f" && {SCRIPT_DONE}"
                        " && document.querySelector('.js-plotly-plot .main-svg, [data-testid=\"stVegaLiteChart\"] .marks'); }",
                        arg=heading, timeout=120_000)
                    wall.append(time.perf_counter() - start)
                    cpu_server.append(cpu_of([server]) - server_start)
                    cpu_browser.append(cpu_of(chromium()) - browser_start)
                    back_to_runs(page)
                rows.append([title, f"{wall[0]:.2f}", f"{cpu_server[0]:.2f}", f"{cpu_browser[0]:.2f}",
                             spread(wall[1:], "{:.2f}"), spread(cpu_server[1:], "{:.2f}"),
                             spread(cpu_browser[1:], "{:.2f}"), verdict(wall[1:], 2.0)])
                print(rows[-1], flush=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return ("Page change in headless Chromium, from the click in the sidebar until the new page's heading is shown, "
            "its script has finished (the app's script state) and its main chart is drawn (after 8 s on the first "
            f"page, while the app warms its imports in the background); {visits} visits per page, back to Runs (its "
            "own heading, its run over) in between; the first visit of a page apart, later visits: median "
            "(min–max, n). CPU = seconds of CPU the Streamlit server and Chromium (all its processes) used during the "
            "page change: on a loaded machine the wall time includes waiting for a CPU; their sum bounds what an idle "
            "machine's wall time needs. Target: a page change < 2 s (judged on the later visits' wall median).\n\n"
            + table(["page", "first visit, wall (s)", "first: server CPU (s)", "first: browser CPU (s)",
                     "later visits, wall (s)", "later: server CPU (s)", "later: browser CPU (s)", "< 2 s"], rows))


def cpu_of(processes) -> float:
    """User + system CPU seconds of these processes and their children, so far (gone ones count 0)."""
    import psutil

    total = 0.0
    for process in processes:
        try:
            process = process if isinstance(process, psutil.Process) else psutil.Process(process.pid)
            for p in [process, *process.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def chromium() -> list:
    """The Chromium processes this benchmark started (Playwright's driver launches them below this process)."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "chrom" in p.name().lower()
            and not any("chrom" in a.name().lower() for a in p.parents()[:1])]


if __name__ == "__main__":
    main()
