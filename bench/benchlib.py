"""What every benchmark shares: the machine line, spread statistics, and regenerating a
marked section of docs/BENCHMARKS.md.

A section is the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; a
benchmark run with `--write` replaces it with the tables it just measured, so every
figure in the document comes from the script named above it.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
from datetime import datetime, timezone
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> str:
    """One line: CPU, cores, memory, load, torch threads, UTC date."""
    import psutil

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    parts = [f"{cpu_name()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
             f"load average {load} at the end (other sessions share this machine)"]
    if threads is not None:
        parts.append(f"{threads} torch thread(s)")
    parts.append(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return "; ".join(parts)


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """`median (min–max, n=N)` of a list of measurements."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))}, n={len(values)})"


def ratios(values: list[float], reference: list[float]) -> list[float]:
    """Per-repetition ratios of interleaved measurements."""
    return [v / r for v, r in zip(values, reference)]


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace the marked section NAME of docs/BENCHMARKS.md with `body`."""
    text = doc.read_text()
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no section {begin} ... {end}")
    doc.write_text(pattern.sub(lambda _: f"{begin}\n{body.strip()}\n{end}", text))
    print(f"updated section {name} of {doc}")


# JavaScript, true when the dashboard's script run is over: Streamlit keeps the state on stApp
# (`notRunning`); the status widget is no proof, it appears only a moment after a run starts.
SCRIPT_DONE = "document.querySelector('[data-testid=\"stApp\"]').dataset.testScriptState === 'notRunning'"


def back_to_runs(page, timeout_ms: int = 60_000) -> None:
    """Click Runs in a dashboard's sidebar (a Playwright page) and wait until Runs itself is shown.

    Waiting for any table is not enough: the page just left may still show its own, so the wait
    ended early and the next click queued behind that page's run. Runs' own heading, its table
    and its run over mean the app is idle on Runs.
    """
    page.get_by_role("link", name="Runs").click()
    page.wait_for_function("() => { const t = document.querySelector('h1'); return t && t.innerText.trim() === 'Runs'"
                           f" && {SCRIPT_DONE} && document.querySelector('[data-testid=\"stDataFrame\"]'); }}",
                           timeout=timeout_ms)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
