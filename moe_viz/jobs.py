"""Background jobs for the dashboard: a subprocess per job, progress in a file.

Streamlit must not be driven from other threads, so long work runs as
`python -m moe_viz COMMAND ... --progress-file F` in its own process; the page
polls `job_status`. A job has a kind, the `moe-viz` command it runs (`capture`,
`sweep`, `evaluate`, `trace`). A job directory holds the kind, the command, the process
(pid and start time, in `pid`), the progress JSON (`finished: true` once the
command completed), stderr, and any input file the command reads (a plan).

A pid alone does not name a process for long: once the job has ended, the
system may give its pid to any other process. So the job records the child's
start time too, and a pid whose process started at another time is not the
job: it is never signalled and never reported as running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil


def jobs_dir(store_path: str | Path) -> Path:
    return Path(store_path).resolve().parent / "jobs"


def _new_job(store_path: str | Path, kind: str) -> tuple[str, Path]:
    """A fresh job directory (id: start time + random suffix) with its kind recorded."""
    job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    folder = jobs_dir(store_path) / job_id
    folder.mkdir(parents=True)
    (folder / "kind").write_text(kind)
    return job_id, folder


def default_threads() -> int | None:
    """Torch threads for jobs started without an explicit count: `moe-viz ui/demo --threads N` sets MOE_VIZ_THREADS."""
    value = os.environ.get("MOE_VIZ_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _launch(folder: Path, kind: str, arguments: list[str], threads: int | None = None) -> None:
    """Start `python -m moe_viz [--threads N] KIND ARGUMENTS --progress-file F`; record pid and start time.

    `threads` None: the dashboard's setting (`default_threads`); 0 (or no setting): torch's choice.
    """
    threads = default_threads() if threads is None else threads
    command = [sys.executable, "-m", "moe_viz", *(["--threads", str(threads)] if threads else []), kind,
               *arguments, "--progress-file", str(folder / "progress.json")]
    (folder / "command.json").write_text(json.dumps(command))
    with open(folder / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    # Not yet reaped, so the child exists (if only as a zombie) and its start time can be read.
    started = psutil.Process(process.pid).create_time()
    tmp = folder / "pid.tmp"
    tmp.write_text(f"{process.pid} {started!r}\n")
    tmp.replace(folder / "pid")  # list_jobs/job_status never see a half-written pid file


def start_capture(store_path: str | Path, model: str, domains: list[str], max_tokens: int, seq_len: int,
                  batch_size: int, device: str = "auto", threads: int | None = None) -> str:
    """Start a capture in the background; returns the job id."""
    job_id, folder = _new_job(store_path, "capture")
    arguments = ["--model", model, "--store", str(store_path), "--max-tokens", str(max_tokens),
                 "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--device", device]
    for domain in domains:
        arguments += ["--domain", domain]
    _launch(folder, "capture", arguments, threads)
    return job_id


def _evaluation_options(domains: dict[str, float], eval_domains: list[str], seq_len: int, max_tokens: int,
                        batch_size: int, device: str, seed: int) -> list[str]:
    out = [f"--domain={name}:{weight:g}" for name, weight in domains.items()]
    out += [f"--eval-domain={spec}" for spec in eval_domains]
    return out + ["--seq-len", str(seq_len), "--max-tokens", str(max_tokens), "--batch-size", str(batch_size),
                  "--device", device, "--seed", str(seed)]


def start_sweep(store_path: str | Path, model: str, criteria: list[str], sparsities: list[float],
                domains: dict[str, float], eval_domains: list[str] | None = None, scopes: list[str] | None = None,
                seq_len: int = 128, max_tokens: int = 2048, batch_size: int = 8, device: str = "auto",
                seed: int = 0, threads: int | None = None) -> str:
    """Start `moe-viz sweep` in the background (results land in the store's plan_evals); returns the job id.

    `domains`: calibration domain -> weight; `eval_domains`: NAME=SOURCE evaluation text (default:
    held-out text of the calibration domains). Progress: done, total, cached, elapsed_s, eta_s.
    """
    job_id, folder = _new_job(store_path, "sweep")
    arguments = ["--model", model, "--store", str(store_path), "--criteria", ",".join(criteria),
                 "--sparsities", ",".join(f"{s:g}" for s in sparsities), "--scopes", ",".join(scopes or ["uniform"]),
                 *_evaluation_options(domains, eval_domains or [], seq_len, max_tokens, batch_size, device, seed)]
    _launch(folder, "sweep", arguments, threads)
    return job_id


def start_evaluate(store_path: str | Path, model: str, plan_json: str, eval_domains: list[str] | None = None,
                   seq_len: int = 128, max_tokens: int = 2048, batch_size: int = 8, device: str = "auto",
                   seed: int = 0, threads: int | None = None) -> str:
    """Evaluate one plan (its JSON) in the background and store the result in plan_evals; returns the job id."""
    job_id, folder = _new_job(store_path, "evaluate")
    (folder / "plan.json").write_text(plan_json)
    arguments = ["--model", model, "--store", str(store_path), "--plan", str(folder / "plan.json"), "--store-result",
                 *_evaluation_options({}, eval_domains or [], seq_len, max_tokens, batch_size, device, seed)]
    _launch(folder, "evaluate", arguments, threads)
    return job_id


def start_trace(store_path: str | Path, model: str, text: str, max_tokens: int = 2048, device: str = "auto",
                threads: int | None = None) -> str:
    """Trace the routing of `text` in the background (`moe-viz trace`); the trace lands in `trace_dir`."""
    job_id, folder = _new_job(store_path, "trace")
    (folder / "text.txt").write_text(text, encoding="utf-8")
    arguments = ["--model", model, "--text-file", str(folder / "text.txt"), "--out", str(folder / "trace"),
                 "--max-tokens", str(max_tokens), "--device", device]
    _launch(folder, "trace", arguments, threads)
    return job_id


def trace_dir(store_path: str | Path, job_id: str) -> Path:
    """Where a trace job writes its Parquet files (present once the job is done)."""
    return jobs_dir(store_path) / job_id / "trace"


def job_kind(store_path: str | Path, job_id: str) -> str:
    """What a job runs; jobs recorded before kinds were kept are captures."""
    path = jobs_dir(store_path) / job_id / "kind"
    return path.read_text().strip() if path.exists() else "capture"


def _recorded_process(folder: Path) -> tuple[int, float | None]:
    """(pid, start time) of a job; start time None for jobs recorded before it was kept."""
    fields = (folder / "pid").read_text().split()
    return int(fields[0]), (float(fields[1]) if len(fields) > 1 else None)


def _is_the_job(pid: int, started: float | None) -> bool:
    """Whether `pid` is still the job's process: alive (not a zombie) and started when the job did."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reap our own finished children
        if finished:
            return False
    except ChildProcessError:
        pass  # not our child (another dashboard process started it)
    if started is None:
        return False  # cannot prove it is the job: never signal it, never call it running
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False


def job_status(store_path: str | Path, job_id: str) -> dict:
    """kind, state (running | done | failed | cancelled), progress dict, and a one-line error."""
    folder = jobs_dir(store_path) / job_id
    kind = job_kind(store_path, job_id)
    progress = {}
    if (folder / "progress.json").exists():
        try:
            progress = json.loads((folder / "progress.json").read_text())
        except json.JSONDecodeError:
            progress = {}  # caught mid-replace; the next poll reads it
    pid, started = _recorded_process(folder)
    if (folder / "cancelled").exists():
        state = "cancelled"
    elif _is_the_job(pid, started):
        state = "running"
    else:
        state = "done" if progress.get("finished") else "failed"
    error = ""
    if state == "failed":
        lines = (folder / "stderr.log").read_text(errors="replace").strip().splitlines()
        errors = [l for l in lines if l.startswith("moe-viz: error:")]
        error = (errors[-1] if errors else (lines[-1] if lines else f"the {kind} process exited")).removeprefix("moe-viz: error: ")
    return {"job_id": job_id, "kind": kind, "state": state, "progress": progress, "error": error}


def list_jobs(store_path: str | Path, kind: str | None = "capture") -> list[str]:
    """Job ids of one kind (all kinds with kind=None), newest first."""
    folder = jobs_dir(store_path)
    if not folder.exists():
        return []
    started = (p.name for p in folder.iterdir() if (p / "pid").exists())
    return sorted((j for j in started if kind is None or job_kind(store_path, j) == kind), reverse=True)


def cancel(store_path: str | Path, job_id: str) -> None:
    """Stop a running job; a capture marks its run failed on the way out, a sweep keeps the plans it stored.

    Signals the job's process only if its pid still names it (same start time):
    a job that already ended leaves its pid to others, and they are left alone.
    """
    folder = jobs_dir(store_path) / job_id
    (folder / "cancelled").write_text("")
    pid, started = _recorded_process(folder)
    try:
        # A pidfd names one process for good, so the pid cannot change hands between check and signal.
        handle = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except ProcessLookupError:
        return
    except OSError:
        handle = None  # kernel without pidfd: check, then signal by pid
    try:
        if not _is_the_job(pid, started):
            return
        if handle is not None:
            signal.pidfd_send_signal(handle, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    finally:
        if handle is not None:
            os.close(handle)
