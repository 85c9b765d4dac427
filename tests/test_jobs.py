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
