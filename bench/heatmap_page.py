"""Heatmaps page in Chromium: this checkout against a reference checkout, interleaved, on the big store.

    python bench/heatmap_page.py --reference /work/main [--reference OTHER ...] [--layers 94 --experts 512] [--reps 5]
        [--write]   # replaces the section bench:heatmap-page of docs/BENCHMARKS.md

Starts one dashboard per checkout (this one and each --reference) on the same synthetic store (LAYERS x EXPERTS x 10 domains,
built by bench/dashboard.py's build_store if missing) and, alternating between them,
times a page change Runs -> Heatmaps until the heatmap is drawn (Plotly's image, Vega's painted canvas)
and the script run is over (the app's script state is notRunning). Going back, it waits for Runs' own
heading with its run over, not for any table (the page just left may still show one). Reports the median,
min and max per checkout and each ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import dashboard  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
# Drawn: Plotly's heatmap image is in the SVG, or Vega's canvas has paint at its centre (a cell: the
# canvas element exists before Vega has run its dataflow), or Vega's SVG has its marks.
DRAWN = ("h => { const t = document.querySelector('h1');"
         f" if (!t || t.innerText.trim() !== h || !({benchlib.SCRIPT_DONE})) return false;"
         " if (document.querySelector('.js-plotly-plot g.hm image, [data-testid=\"stVegaLiteChart\"] svg.marks path'))"
         " return true;"
         " const c = document.querySelector('[data-testid=\"stVegaLiteChart\"] canvas.marks');"
         " return !!c && c.width > 0 && c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data[3] > 0; }")


def start(checkout: Path, store: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(checkout / "app.py"), "--server.address",
                               "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
                               "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
                               "--", "--store", str(store)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=checkout, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            return server, url
        except OSError:
            if time.time() > deadline:
                server.kill()
                raise SystemExit(f"the dashboard of {checkout} did not start")
            time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, action="append", help="another checkout (e.g. /work/main)")
    parser.add_argument("--layers", type=int, default=dashboard.LAYERS)
    parser.add_argument("--experts", type=int, default=dashboard.EXPERTS)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace the bench:heatmap-page section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    store = Path(f"/tmp/moe_viz_big_{args.layers}x{args.experts}.duckdb")
    if not store.exists():
        dashboard.LAYERS, dashboard.EXPERTS = args.layers, args.experts
        dashboard.build_store(store)
    checkouts = {f"reference{i + 1}" if len(args.reference) > 1 else "reference": Path(path).resolve()
                 for i, path in enumerate(args.reference)}
    checkouts["this"] = HERE
    servers = {name: start(path, store) for name, path in checkouts.items()}
    times: dict[str, list[float]] = {name: [] for name in checkouts}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            pages = {}
            for name, (_, url) in servers.items():
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(url)
                page.wait_for_function(DRAWN, arg="Expert heatmaps", timeout=180_000)
                pages[name] = page
            for rep in range(args.reps + 1):  # the first round warms both servers' caches and is not counted
                for name in (list(checkouts) if rep % 2 else list(checkouts)[::-1]):  # alternate who goes first
                    page = pages[name]
                    benchlib.back_to_runs(page)
                    started = time.perf_counter()
                    page.get_by_role("link", name="Heatmaps").click()
                    page.wait_for_function(DRAWN, arg="Expert heatmaps", timeout=180_000)
                    if rep:
                        times[name].append(time.perf_counter() - started)
            browser.close()
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=60)
    for name, values in times.items():
        print(f"{name:<10} {checkouts[name]}: median {statistics.median(values):.2f} s "
              f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})")
    for name in checkouts:
        if name != "this":
            print(f"ratio this / {name} (medians): "
                  f"{statistics.median(times['this']) / statistics.median(times[name]):.2f}")
    if args.write:
        rows = [[f"{name}: `{checkouts[name]}` at {_commit(checkouts[name])}", benchlib.spread(values, "{:.2f}"),
                 "" if name == "this" else benchlib.spread(benchlib.ratios(times["this"], values), "{:.2f}")]
                for name, values in times.items()]
        benchlib.write_section("heatmap-page", f"{args.layers} × {args.experts} cells, 10 domains; {benchlib.machine()}"
                               f"\n\n" + benchlib.table(["checkout", "page change Runs → Heatmaps, s",
                                                          "this / it, per repetition"], rows))


def _commit(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    main()
