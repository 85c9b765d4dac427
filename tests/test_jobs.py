"""Background capture jobs (what the Runs page starts): progress, completion, cancellation."""

import time

from moe_viz import jobs, store
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
    import json

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
