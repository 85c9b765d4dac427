"""Where a capture's time goes, per process (rank), and the throughput of its capture phase.

`Timings` adds up wall seconds per named phase. `start-up` is the process's age
when the capture began (interpreter start, imports, argument parsing), read
from the OS's process start time. `moe-viz capture --timing` prints every
rank's phases (rank 0 gathers them); every stored run records the throughput
of its capture phase in `settings` (`capture_phase`, see `capture_phase`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

# Phases in the order a capture goes through them (others are printed after these).
ORDER = ("start-up", "check inputs", "load model", "pack tokens", "wait for ranks", "layer-wise pass",
         "layer-wise pass CPU", "forward", "forward CPU", "failure checks", "all-reduce", "frames", "store", "peak RSS")


PEAK_RSS = "peak RSS"  # printed with the phases, in MiB


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB; Linux/macOS ru_maxrss)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


class Timings:
    """Wall seconds per phase of this process."""

    def __init__(self, started_at: float | None = None):
        self.seconds: dict[str, float] = {}
        if started_at is not None:
            self.seconds["start-up"] = max(0.0, time.time() - started_at)

    @classmethod
    def of_this_process(cls) -> "Timings":
        import psutil

        return cls(psutil.Process().create_time())

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str, cpu: bool = False):
        """Time the body; `cpu` also adds the process's CPU seconds (all threads) as "NAME CPU"."""
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)
            if cpu:
                self.add(f"{name} CPU", time.process_time() - start_cpu)


def format_timings(per_rank: list[dict[str, float]]) -> str:
    """One line per rank: `moe-viz: timing rank R: phase S s, ...` in capture order."""
    lines = []
    for rank, seconds in enumerate(per_rank):
        names = [n for n in ORDER if n in seconds] + sorted(n for n in seconds if n not in ORDER)
        parts = ", ".join(f"{name} {seconds[name]:.0f} MiB" if name == PEAK_RSS else f"{name} {seconds[name]:.2f} s"
                          for name in names)
        lines.append(f"moe-viz: timing rank {rank} of {len(per_rank)}: {parts}")
    return "\n".join(lines)


def capture_phase(tokens: int, seconds: float, scope: str) -> dict:
    """What a run records about its capture phase (first batch to reduced accumulators, every rank)."""
    return {"capture_phase": {"seconds": round(seconds, 6), "tokens": int(tokens),
                              "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None, "scope": scope}}
