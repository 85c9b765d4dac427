"""Background capture jobs for the dashboard: a subprocess per job, progress in a file.

Streamlit must not be driven from other threads, so long work runs as
`python -m moe_viz capture ... --progress-file F` in its own process; the page
polls `job_status`. A job directory holds the command, the pid, the progress
JSON and stderr.
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


def jobs_dir(store_path: str | Path) -> Path:
    return Path(store_path).resolve().parent / "jobs"


def start_capture(store_path: str | Path, model: str, domains: list[str], max_tokens: int, seq_len: int,
                  batch_size: int, device: str = "auto") -> str:
    """Start a capture in the background; returns the job id."""
    job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    folder = jobs_dir(store_path) / job_id
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "moe_viz", "capture", "--model", model, "--store", str(store_path),
               "--max-tokens", str(max_tokens), "--seq-len", str(seq_len), "--batch-size", str(batch_size),
               "--device", device, "--progress-file", str(folder / "progress.json")]
    for domain in domains:
        command += ["--domain", domain]
    (folder / "command.json").write_text(json.dumps(command))
    with open(folder / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    (folder / "pid").write_text(str(process.pid))
    return job_id


def _alive(pid: int) -> bool:
    try:
        finished, status = os.waitpid(pid, os.WNOHANG)  # reap our own finished children
        if finished:
            return False
    except ChildProcessError:
        pass  # not our child (another dashboard process started it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def job_status(store_path: str | Path, job_id: str) -> dict:
    """state (running | done | failed | cancelled), progress dict, and a one-line error."""
    folder = jobs_dir(store_path) / job_id
    progress = {}
    if (folder / "progress.json").exists():
        try:
            progress = json.loads((folder / "progress.json").read_text())
        except json.JSONDecodeError:
            progress = {}  # caught mid-replace; the next poll reads it
    pid = int((folder / "pid").read_text())
    if (folder / "cancelled").exists():
        state = "cancelled"
    elif _alive(pid):
        state = "running"
    else:
        state = "done" if progress.get("finished") else "failed"
    error = ""
    if state == "failed":
        lines = (folder / "stderr.log").read_text(errors="replace").strip().splitlines()
        errors = [l for l in lines if l.startswith("moe-viz: error:")]
        error = (errors[-1] if errors else (lines[-1] if lines else "the capture process exited")).removeprefix("moe-viz: error: ")
    return {"job_id": job_id, "state": state, "progress": progress, "error": error}


def list_jobs(store_path: str | Path) -> list[str]:
    folder = jobs_dir(store_path)
    return sorted((p.name for p in folder.iterdir() if (p / "pid").exists()), reverse=True) if folder.exists() else []


def cancel(store_path: str | Path, job_id: str) -> None:
    """Stop a running job; the capture marks its run failed on the way out."""
    folder = jobs_dir(store_path) / job_id
    (folder / "cancelled").write_text("")
    try:
        os.kill(int((folder / "pid").read_text()), signal.SIGTERM)
    except ProcessLookupError:
        pass
