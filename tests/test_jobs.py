"""Background capture jobs (what the Runs page starts): progress, completion, cancellation."""

import json
import subprocess
import sys
import time

from moe_viz import jobs, store
from run_rows import job_folder, pid_line, stand_in_process
from tiny_models import SAMPLE_TEXT, save_tiny_model


def _wait(predicate, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_job_runs_to_completion_then_a_cancelled_job_leaves_a_failed_run(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    text = tmp_path / "code.txt"
    text.write_text(SAMPLE_TEXT * 400)
    db = tmp_path / "store.duckdb"

    done = jobs.start_capture(db, str(model), [f"code={text}"], max_tokens=500, seq_len=64, batch_size=4)
    assert _wait(lambda: jobs.job_status(db, done)["state"] != "running")
    status = jobs.job_status(db, done)
    assert status["state"] == "done", status
    assert store.list_runs(db).status.tolist() == ["complete"]

    slow = jobs.start_capture(db, str(model), [f"slow={text}"], max_tokens=200_000, seq_len=16, batch_size=1)
    assert _wait(lambda: jobs.job_status(db, slow)["progress"].get("tokens_done", 0) > 0)
    assert jobs.job_status(db, slow)["state"] == "running"
    jobs.cancel(db, slow)
    assert _wait(lambda: "slow" in set(store.list_runs(db, status="failed").domain), seconds=60)
    assert jobs.job_status(db, slow)["state"] == "cancelled"
    assert jobs.list_jobs(db) == sorted([done, slow], reverse=True)
    failed = store.list_runs(db, status="failed")
    assert store.expert_stats(db, failed.run_id.tolist()).empty


def test_jobs_record_threads_explicit_or_from_the_dashboard_setting(tmp_path, monkeypatch):
    """`moe-viz ui --threads N` sets MOE_VIZ_THREADS; jobs started without a count use it, 0 means torch's choice."""
    db = tmp_path / "store.duckdb"
    missing = f"broken={tmp_path / 'missing.txt'}"  # fails before any model loads
    monkeypatch.setenv("MOE_VIZ_THREADS", "2")
    started = {
        "explicit": jobs.start_capture(db, str(tmp_path), [missing], 10, 8, 1, threads=1),
        "dashboard": jobs.start_capture(db, str(tmp_path), [missing], 10, 8, 1),
        "torch": jobs.start_capture(db, str(tmp_path), [missing], 10, 8, 1, threads=0),
    }
    commands = {name: json.loads((jobs.jobs_dir(db) / job / "command.json").read_text())[3:]
                for name, job in started.items()}
    assert commands["explicit"][:3] == ["--threads", "1", "capture"]
    assert commands["dashboard"][:3] == ["--threads", "2", "capture"]
    assert commands["torch"][0] == "capture"
    for job in started.values():
        assert _wait(lambda: jobs.job_status(db, job)["state"] != "running")


# -- job files read back: states, errors, listing (hand-made job folders, real processes) ---------------

def _ended_process() -> str:
    """The pid file of a process of ours that has ended and been reaped."""
    proc = stand_in_process()
    line = pid_line(proc.pid)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    return line


def test_a_job_that_ended_unfinished_reads_failed_and_names_its_error(tmp_path):
    db = tmp_path / "store.duckdb"
    line = _ended_process()
    unfinished = {"domain": "code", "tokens_done": 500, "tokens_total": 500, "elapsed_s": 1.0, "detail": "",
                  "finished": False}  # the last domain's last report: the run was still to be stored
    cases = {
        "20250101-000000-aaaaaa": job_folder(db, "20250101-000000-aaaaaa", line, progress=unfinished, stderr=(
            "capture code: 100%|#####| 500/500\nmoe-viz: error: the store is locked by another process\n"
            "resource_tracker: There appear to be 1 leaked semaphore objects\n")),
        "20250101-000000-bbbbbb": job_folder(db, "20250101-000000-bbbbbb", line, progress=unfinished,
                                              stderr="Traceback (most recent call last):\nMemoryError\n"),
        "20250101-000000-cccccc": job_folder(db, "20250101-000000-cccccc", line, kind="sweep"),
        "20250101-000000-dddddd": job_folder(db, "20250101-000000-dddddd", line,
                                              progress={"finished": True, "run_ids": ["r1"]}),
    }
    got = [(jobs.job_status(db, job)["state"], jobs.job_status(db, job)["error"]) for job in cases]
    assert got == [("failed", "the store is locked by another process"), ("failed", "MemoryError"),
                   ("failed", "the sweep process exited"), ("done", "")]


def test_only_started_jobs_are_listed_and_jobs_without_a_kind_are_captures(tmp_path):
    db = tmp_path / "store.duckdb"
    line = _ended_process()
    job_folder(db, "20250101-000000-aaaaaa", line)
    job_folder(db, "20250101-000001-bbbbbb", line, kind=None)  # recorded before kinds were kept
    job_folder(db, "20250101-000002-cccccc", None)  # being started: no pid yet, nothing to report on
    job_folder(db, "20250101-000003-dddddd", line, kind="sweep")
    assert jobs.list_jobs(db) == ["20250101-000001-bbbbbb", "20250101-000000-aaaaaa"]
    assert jobs.list_jobs(db, kind=None) == ["20250101-000003-dddddd", "20250101-000001-bbbbbb",
                                             "20250101-000000-aaaaaa"]
    assert jobs.job_kind(db, "20250101-000001-bbbbbb") == "capture"
    assert jobs.job_status(db, "20250101-000001-bbbbbb")["kind"] == "capture"


IGNORES_SIGTERM = ("import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                   "sys.stdin.read()")


def test_a_cancelled_job_reads_cancelled_while_its_process_is_still_winding_down(tmp_path):
    """A capture takes a while to mark its run failed after SIGTERM: the page must not offer Cancel again."""
    db = tmp_path / "store.duckdb"
    slow = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert slow.stdout.readline().strip() == "ready"
        job = "20250101-000000-aaaaaa"
        job_folder(db, job, pid_line(slow.pid))
        assert jobs.job_status(db, job)["state"] == "running"
        jobs.cancel(db, job)
        assert slow.poll() is None  # it ignores SIGTERM: still alive
        assert jobs.job_status(db, job) == {"job_id": job, "kind": "capture", "state": "cancelled", "progress": {},
                                            "error": ""}
        slow.stdin.close()
        assert slow.wait(timeout=60) == 0
    finally:
        if slow.poll() is None:
            slow.kill()


def test_progress_file_says_finished_only_when_the_command_has_completed(tmp_path):
    """Each report mirrors the progress; `finished` stays false (the command itself writes it after storing)."""
    from moe_viz.capture.run import Progress
    from moe_viz.cli import _file_progress

    seen = []
    report = _file_progress(tmp_path / "progress.json", seen.append)
    last = Progress("code", 500, 500, 12.3456, "layer 2/2")  # every token of the domain done
    report(last)
    assert seen == [last]
    assert json.loads((tmp_path / "progress.json").read_text()) == {
        "domain": "code", "tokens_done": 500, "tokens_total": 500, "elapsed_s": 12.35, "detail": "layer 2/2",
        "finished": False}
