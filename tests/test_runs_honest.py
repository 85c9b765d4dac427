"""Runs and jobs that cannot lie: dead captures read `interrupted`, Cancel never signals a stranger,
a capture that cannot commit keeps its statistics in a file to import.

Real DuckDB, real subprocesses; every wait is a handshake or a poll for a state that,
once reached, stays (never a sleep standing in for synchronisation).
"""

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from moe_viz import jobs, store
from moe_viz.capture.run import CaptureSettings, capture_model
from moe_viz.cli import main
from moe_viz.errors import MoeVizError
from moe_viz.capture.sources import Documents
from run_rows import pid_line, register_run, run_frames, stand_in_process
from tiny_models import SAMPLE_TEXT, save_tiny_model, tiny_model, tiny_tokenizer

TEXT = "def f(x):\n    return x + 1\n" * 40


def _wait_for(predicate, seconds=240, what="condition"):
    """Poll until `predicate()` is true (a state that stays once reached); fail after a generous deadline."""
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _sql(path, query, *params):
    with store.connect(path, read_only=True) as con:  # waits (like any reader) while a writer commits
        return con.execute(query, list(params)).fetchall()


def _update(path, query, *params):
    with store.connect(path) as con:
        con.execute(query, list(params))


def _status(path, run_id):
    runs = store.list_runs(path)
    return runs.set_index("run_id").loc[run_id, "status"]


# -- interrupted runs ----------------------------------------------------------

def test_a_killed_capture_reads_interrupted(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    text = tmp_path / "slow.txt"
    text.write_text(SAMPLE_TEXT * 400)
    db = tmp_path / "store.duckdb"
    progress = tmp_path / "progress.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_viz", "--threads", "1", "capture", "--model", str(model), "--domain", f"slow={text}",
         "--store", str(db), "--max-tokens", "200000", "--seq-len", "16", "--batch-size", "1",
         "--progress-file", str(progress)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # progress is written after the first batch, i.e. after begin_run registered the run
        _wait_for(lambda: progress.exists() or proc.poll() is not None, what="the capture's first batch")
        assert proc.poll() is None, proc.stderr.read()
        [(run_id, pid, host, started)] = _sql(db, "SELECT run_id, pid, host, process_started FROM runs")
        assert pid == proc.pid and host and started == pytest.approx(psutil.Process(proc.pid).create_time())
        assert _status(db, run_id) == "running"  # alive: running, whatever its heartbeat
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _sql(db, "SELECT status FROM runs") == [("running",)]  # what the row says...
    assert _status(db, run_id) == "interrupted"  # ...and what a reader is told
    assert store.list_runs(db, status="running").empty
    assert store.list_runs(db, status="interrupted").run_id.tolist() == [run_id]


def test_a_reused_pid_does_not_keep_a_run_running(store_path):
    run_id = register_run(store_path)
    assert _status(store_path, run_id) == "running"  # this very process, alive
    [(started,)] = _sql(store_path, "SELECT process_started FROM runs")
    # the same pid, but a process that started at another time: the run's process is gone
    _update(store_path, "UPDATE runs SET process_started = ?", started - 3600)
    assert _status(store_path, run_id) == "interrupted"
    # a pid that no longer exists at all
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _update(store_path, "UPDATE runs SET pid = ?, process_started = ?", gone.pid, started)
    assert not psutil.pid_exists(gone.pid) or psutil.Process(gone.pid).create_time() != started
    assert _status(store_path, run_id) == "interrupted"


def test_a_run_on_another_host_is_judged_by_its_heartbeat(store_path):
    run_id = register_run(store_path)
    now = store._now()
    _update(store_path, "UPDATE runs SET host = 'elsewhere', heartbeat_at = ?", now)
    assert _status(store_path, run_id) == "running"
    _update(store_path, "UPDATE runs SET heartbeat_at = ?",
            now - pd.Timedelta(seconds=store.HEARTBEAT_STALE_S + 60))
    assert _status(store_path, run_id) == "interrupted"
    # same host name, other pid namespace (another container): the pid means nothing here either
    _update(store_path, "UPDATE runs SET host = ?, pid_namespace = 'other-boot/pid:[1]', heartbeat_at = ?",
            __import__("socket").gethostname(), now)
    assert _status(store_path, run_id) == "running"


def test_the_capture_heartbeat_advances_while_it_runs(store_path, monkeypatch):
    monkeypatch.setattr(store, "HEARTBEAT_INTERVAL_S", 0.05)
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    beats = []

    def on_progress(p):
        if beats:
            return
        first = store.list_runs(store_path).heartbeat_at[0]  # begin_run's
        beats.append(first)
        # the reads go through the store's retries: the heartbeat thread writes from this same process
        _wait_for(lambda: store.list_runs(store_path).heartbeat_at[0] > first, what="a heartbeat from the capture's thread")
        beats.append(store.list_runs(store_path).heartbeat_at[0])

    docs = Documents(domain="code", source="inline", texts=[TEXT])
    capture_model(model, tokenizer, "tiny", [docs], CaptureSettings(max_tokens=200, seq_len=16, batch_size=2),
                  store_path=store_path, progress=on_progress)
    assert len(beats) == 2 and beats[1] > beats[0]
    assert store.list_runs(store_path).status.tolist() == ["complete"]


def test_runs_page_shows_interrupted(store_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    run_id = register_run(store_path)
    _update(store_path, "UPDATE runs SET process_started = process_started - 3600")
    monkeypatch.setattr("sys.argv", ["app.py", "--store", str(store_path)])
    root = Path(__file__).resolve().parent.parent
    at = AppTest.from_file(str(root / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("moe_viz/ui/pages/runs.py").run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(e.value for e in at.dataframe if {"run_id", "status"} <= set(e.value.columns))
    assert table.set_index("run_id").loc[run_id, "status"] == "interrupted"
    assert any("interrupted" in c.value for c in at.caption)


# -- Cancel and pid reuse ----------------------------------------------------------

def _ended_job(tmp_path):
    """A real job that has ended (its source is missing), so its pid is free for others."""
    db = tmp_path / "store.duckdb"
    job = jobs.start_capture(db, str(tmp_path / "no-model"), [f"x={tmp_path / 'missing.txt'}"], 100, 16, 1)
    _wait_for(lambda: jobs.job_status(db, job)["state"] != "running", what="the job to end")
    assert jobs.job_status(db, job)["state"] == "failed"
    return db, job


def _pid_file(db, job):
    return jobs.jobs_dir(db) / job / "pid"


def test_cancel_never_signals_a_process_that_reused_the_jobs_pid(tmp_path):
    db, job = _ended_job(tmp_path)
    pid, started = _pid_file(db, job).read_text().split()  # pid and start time, recorded at start
    int(pid), float(started)
    stranger = stand_in_process()
    try:
        # the system gave the job's pid to another process: same pid, other start time
        _pid_file(db, job).write_text(f"{stranger.pid} {started}\n")
        assert jobs.job_status(db, job)["state"] == "failed"  # not `running`
        jobs.cancel(db, job)  # kill(2) has returned: had it signalled, SIGTERM would now be pending
        stranger.stdin.close()
        assert stranger.wait(timeout=60) == 0
    finally:
        if stranger.poll() is None:
            stranger.kill()


def test_cancel_signals_the_job_when_pid_and_start_time_match(tmp_path):
    db, job = _ended_job(tmp_path)
    stranger = stand_in_process()  # stands in for the job's own process: its real pid and start time
    try:
        _pid_file(db, job).write_text(pid_line(stranger.pid))
        assert jobs.job_status(db, job)["state"] == "running"
        jobs.cancel(db, job)
        assert stranger.wait(timeout=60) == -signal.SIGTERM
        assert jobs.job_status(db, job)["state"] == "cancelled"
    finally:
        if stranger.poll() is None:
            stranger.kill()


def test_a_job_recorded_without_a_start_time_is_never_signalled(tmp_path):
    db, job = _ended_job(tmp_path)
    stranger = stand_in_process()
    try:
        _pid_file(db, job).write_text(str(stranger.pid))  # the format before start times were kept
        assert jobs.job_status(db, job)["state"] != "running"
        jobs.cancel(db, job)
        stranger.stdin.close()
        assert stranger.wait(timeout=60) == 0
    finally:
        if stranger.poll() is None:
            stranger.kill()


# -- a final commit that cannot get the lock ---------------------------------------

LOCK_HOLDER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])  # read-write: every other process is locked out
print("locked", flush=True)
sys.stdin.read()                   # until the test closes our stdin
con.close()
"""


class LockHolder:
    """Another process that holds the store read-write until released (pipe handshake both ways)."""

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "locked", self.proc.stderr.read()

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            assert self.proc.wait(timeout=60) == 0


def test_complete_run_saves_the_run_to_a_file_and_import_run_restores_it(tmp_path, monkeypatch):
    db = tmp_path / "store.duckdb"
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    docs = Documents(domain="code", source="inline", texts=[TEXT])
    settings = CaptureSettings(max_tokens=300, seq_len=32, batch_size=4)
    [old] = capture_model(model, tokenizer, "tiny", [docs], settings, store_path=db)  # to be replaced by the import
    expected = store.expert_stats(db, [old])
    old_tokens = int(store.list_runs(db).tokens[0])

    monkeypatch.setenv("MOE_VIZ_COMMIT_TIMEOUT", "1")
    holder = []

    def lock_before_commit(p):
        if p.tokens_done >= p.tokens_total and not holder:
            holder.append(LockHolder(db))  # returns once the other process holds the lock

    try:
        with pytest.raises(store.RunSavedToFile) as info:
            capture_model(model, tokenizer, "tiny", [docs], settings, store_path=db, progress=lock_before_commit)
        message = str(info.value)
        saved = info.value.saved
        assert "\n" not in message and "stayed locked for 1s" in message
        command = message.split("import it with: ", 1)[1]
        assert command == f"moe-viz import-run {saved} --store {db}"
        assert saved.parent == tmp_path / "store.duckdb.pending" and saved.is_dir()
        assert sorted(p.name for p in saved.iterdir()) == [  # the token trace (on by default) is saved too
            "coactivation.parquet", "expert_stats.parquet", "layer_stats.parquet", "run.json", "run_tokens.parquet",
            "token_pieces.parquet", "token_routes.parquet"]
        assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no partial directory left
    finally:
        for h in holder:
            h.release()
    run_id = json.loads((saved / "run.json").read_text())["run_id"]
    # the capture did not mark the run failed: it is `running` in the row, and its process (us) lives
    assert _sql(db, "SELECT status FROM runs WHERE run_id = ?", run_id) == [("running",)]
    assert store.expert_stats(db, [run_id]).empty

    argv = shlex.split(command)
    assert argv[0] == "moe-viz" and main(argv[1:]) == 0
    runs = store.list_runs(db)
    assert runs.run_id.tolist() == [run_id] and runs.status.tolist() == ["complete"]  # replaced the old run
    assert runs.tokens[0] == old_tokens > 0
    got = store.expert_stats(db, [run_id])
    pd.testing.assert_frame_equal(got.drop(columns="run_id"), expected.drop(columns="run_id"))
    assert not saved.exists()


def test_import_run_rows_equal_what_complete_run_was_given(tmp_path):
    db = tmp_path / "store.duckdb"
    run_id = register_run(db)
    frames = run_frames()
    experts, layers, pairs = frames["expert_stats"], frames["layer_stats"], frames["coactivation"]
    holder = LockHolder(db)
    try:
        with pytest.raises(store.RunSavedToFile) as info:
            store.complete_run(db, run_id, expert_stats=experts, layer_stats=layers, coactivation=pairs,
                               tokens=8, sequences=2, lock_timeout=0.5)
    finally:
        holder.release()
    assert "moe-viz import-run" in str(info.value) and info.value.saved.is_dir()
    again = shutil.copytree(info.value.saved, tmp_path / "again")
    for saved in (info.value.saved, again):  # importing the same run twice replaces its rows, never adds to them
        assert store.import_run_file(saved, db) == run_id
        got = store.expert_stats(db, [run_id]).drop(columns=["domain", "run_id"])
        assert got.pop("recon_error").isna().all()  # measured later by `moe-viz importance`, not by a capture
        pd.testing.assert_frame_equal(got, experts, check_dtype=False)
        got_layers = store.layer_stats(db, [run_id]).drop(columns=["domain", "run_id"])
        pd.testing.assert_frame_equal(got_layers, layers, check_dtype=False)
        pd.testing.assert_frame_equal(store.coactivation(db, run_id, 0), pairs.drop(columns="layer"),
                                      check_dtype=False)
        assert store.list_runs(db).status.tolist() == ["complete"]
        assert _sql(db, "SELECT DISTINCT run_id FROM coactivation") == [(run_id,)]


def test_import_run_of_something_else_is_a_one_line_error(tmp_path, capsys):
    db = tmp_path / "store.duckdb"
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "run.json").write_text("{not json")
    assert main(["import-run", str(junk), "--store", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a run saved by moe_viz" in err
    with pytest.raises(MoeVizError, match="not a run saved"):
        store.import_run_file(tmp_path / "nothing", db)
