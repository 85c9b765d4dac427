import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from moe_viz import store
from moe_viz.capture.run import CaptureSettings, capture_model
from moe_viz.errors import MoeVizError
from moe_viz.capture.sources import Documents
from run_rows import register_run, run_frames
from tiny_models import tiny_model, tiny_tokenizer

SETTINGS = CaptureSettings(max_tokens=400, seq_len=32, batch_size=4)
TEXT = "def f(x):\n    return x + 1\n" * 40


def _capture(model, tokenizer, path, domain="code", progress=None):
    docs = Documents(domain=domain, source="inline", texts=[TEXT])
    return capture_model(model, tokenizer, "tiny", [docs], SETTINGS, store_path=path, progress=progress)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    return tiny_model("qwen3_moe", vocab_size=len(tokenizer)), tokenizer


def test_schema_round_trip(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    [run_id] = _capture(model, tokenizer, store_path)
    runs = store.list_runs(store_path)
    assert runs.status.tolist() == ["complete"] and runs.run_id[0] == run_id
    assert runs.tokens[0] == 400 and runs.sequences[0] == 13

    stored = store.expert_stats(store_path, [run_id])
    assert len(stored) == 2 * 8
    assert stored[["layer", "expert"]].equals(stored.sort_values(["layer", "expert"])[["layer", "expert"]].reset_index(drop=True))
    assert stored.routed_tokens.sum() == 2 * 2 * 400  # layers * top_k * tokens
    layers = store.layer_stats(store_path, [run_id])
    assert layers.tokens.tolist() == [400, 400] and layers.top_k.tolist() == [2, 2]
    pairs = store.coactivation(store_path, run_id, 0)
    assert (pairs.expert_a < pairs.expert_b).all() and pairs.tokens.sum() == 400  # one pair per token at k=2
    with duckdb.connect(str(store_path), read_only=True) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == store.SCHEMA_VERSION


def test_reopening_does_not_migrate_twice(store_path):
    with store.connect(store_path):
        pass
    with store.connect(store_path):
        pass
    with duckdb.connect(str(store_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == store.SCHEMA_VERSION


def test_failed_run_leaves_no_complete_rows(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    [good] = _capture(model, tokenizer, store_path, domain="prose")

    def explode(progress):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        _capture(model, tokenizer, store_path, domain="code", progress=explode)
    runs = store.list_runs(store_path).set_index("domain")
    assert runs.loc["code", "status"] == "failed" and "disk on fire" in runs.loc["code", "error"]
    assert runs.loc["prose", "status"] == "complete"
    failed_id = runs.loc["code", "run_id"]
    assert store.expert_stats(store_path, [failed_id]).empty
    assert len(store.expert_stats(store_path, [good])) == 16


def test_recapture_replaces_the_old_run(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    [first] = _capture(model, tokenizer, store_path)
    before = store.expert_stats(store_path, [first])
    [second] = _capture(model, tokenizer, store_path)
    runs = store.list_runs(store_path)
    assert runs.run_id.tolist() == [second]
    after = store.expert_stats(store_path, [second])
    pd.testing.assert_frame_equal(before.drop(columns="run_id"), after.drop(columns="run_id"))
    with duckdb.connect(str(store_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM expert_stats WHERE run_id = ?", [first]).fetchone()[0] == 0


def test_different_settings_are_kept_side_by_side(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    _capture(model, tokenizer, store_path)
    docs = Documents(domain="code", source="inline", texts=[TEXT])
    capture_model(model, tokenizer, "tiny", [docs], CaptureSettings(max_tokens=200, seq_len=32), store_path=store_path)
    assert len(store.list_runs(store_path, status="complete")) == 2


def test_corrupted_store_gets_one_line_error(tmp_path):
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(MoeVizError) as info:
        store.list_runs(bad)
    assert "\n" not in str(info.value) and "bad.duckdb" in str(info.value)


def test_missing_store_read_is_a_clear_error(tmp_path):
    with pytest.raises(MoeVizError, match="moe-viz demo"):
        store.list_runs(tmp_path / "nothing.duckdb")


def test_reader_in_another_process_works_while_a_capture_runs(store_path, model_and_tokenizer, tmp_path):
    """A separate process polls the store during a capture and must see the run as `running`, then `complete`.

    No race: the capture's first progress report (after begin_run, before the first forward) waits until
    the reader has written that it saw the run running; then the reader waits for `complete`.
    """
    model, tokenizer = model_and_tokenizer
    saw_running = tmp_path / "reader-saw-running"
    reader = textwrap.dedent(
        f"""
        import pathlib, time
        from moe_viz import store
        deadline = time.time() + 240
        seen = []
        while time.time() < deadline:
            try:
                statuses = store.list_runs({str(store_path)!r}).status.tolist()
            except store.MoeVizError as exc:
                if "no store" not in str(exc):
                    raise
                statuses = []
            seen += [s for s in statuses if s not in seen]
            if "running" in statuses:
                pathlib.Path({str(saw_running)!r}).touch()
            if "complete" in statuses:
                break
            time.sleep(0.02)
        print(seen)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def hold_until_the_reader_saw_it(progress) -> None:
        deadline = time.time() + 240
        while not saw_running.exists():
            assert proc.poll() is None and time.time() < deadline, "the reader never saw the run running"
            time.sleep(0.02)

    docs = Documents(domain="code", source="inline", texts=[TEXT * 20])
    capture_model(model, tokenizer, "tiny", [docs], SETTINGS, store_path=store_path, progress=hold_until_the_reader_saw_it)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert out.strip() == "['running', 'complete']"


def test_runs_of_two_models_with_the_same_domain_read_back_together(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    docs = Documents(domain="code", source="inline", texts=[TEXT])
    a = capture_model(model, tokenizer, "model-a", [docs], SETTINGS, store_path=store_path)[0]
    b = capture_model(model, tokenizer, "model-b", [docs], SETTINGS, store_path=store_path)[0]
    both = store.expert_stats(store_path, [a, b])
    assert both.domain.astype(str).unique().tolist() == ["code"]
    assert both.run_id.astype(str).value_counts().to_dict() == {a: 16, b: 16}
    assert store.expert_stats(store_path, [b]).run_id.astype(str).unique().tolist() == [b]


# -- complete_run atomicity --------------------------------------------------------

def test_a_failing_insert_leaves_no_partial_run_and_keeps_the_old_one(store_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    [old] = _capture(model, tokenizer, store_path)
    old_rows = store.expert_stats(store_path, [old])
    [stored] = store.list_runs(store_path).to_dict("records")
    new = store.begin_run(store_path, model_id="tiny", model_fingerprint=stored["model_fingerprint"],
                          model_type="qwen3_moe", domain="code", source=stored["source"],
                          settings=json.loads(stored["settings"]), tool_version="test")
    keys = store.list_runs(store_path).set_index("run_id").settings_key
    assert keys[new] == keys[old]  # completing `new` deletes `old` in the same transaction...
    layers = store.layer_stats(store_path, [old]).drop(columns=["domain", "run_id"])
    pairs = pd.DataFrame({"layer": [0, 0], "expert_a": [0, 1], "expert_b": [1, 2], "tokens": [4, None]})
    with pytest.raises(duckdb.ConstraintException, match="NOT NULL"):  # ...unless an insert fails: the last one here
        store.complete_run(store_path, new, expert_stats=old_rows.drop(columns=["domain", "run_id"]),
                           layer_stats=layers, coactivation=pairs, tokens=400, sequences=13)
    runs = store.list_runs(store_path).set_index("run_id")
    assert runs.loc[old, "status"] == "complete"
    assert runs.loc[new, "status"] == "running" and pd.isna(runs.loc[new, "tokens"])
    pd.testing.assert_frame_equal(store.expert_stats(store_path, [old]), old_rows)
    with duckdb.connect(str(store_path), read_only=True) as con:
        for table in store.STAT_TABLES:
            assert con.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [new]).fetchone()[0] == 0, table
            assert con.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [old]).fetchone()[0] > 0, table


# -- migrations --------------------------------------------------------------------

def test_a_v1_store_migrates_to_the_current_schema_and_keeps_its_runs(store_path):
    with duckdb.connect(str(store_path)) as con:  # a store as moe_viz v1 wrote it
        con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP NOT NULL)")
        for statement in store.MIGRATIONS[1]:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (1, now()::TIMESTAMP)")
        for run_id, status in [("done0000000a", "complete"), ("dead0000000b", "running")]:
            con.execute("""INSERT INTO runs (run_id, model_id, model_fingerprint, domain, source, settings, settings_key,
                           status, started_at, tool_version) VALUES (?, 'm', 'f', ?, 's', '{}', ?, ?, now()::TIMESTAMP, '0.0')""",
                        [run_id, run_id, run_id, status])
        con.execute("INSERT INTO layer_stats VALUES ('done0000000a', 0, 'mlp', 10, 4, 2, 'softmax', 1.0)")
    runs = store.list_runs(store_path).set_index("run_id")  # a reader does not migrate...
    assert runs.loc["dead0000000b", "status"] == "interrupted"  # ...and a v1 `running` row has no process to be alive
    with store.connect(store_path):
        pass
    with duckdb.connect(str(store_path), read_only=True) as con:
        assert [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()] == list(range(1, store.SCHEMA_VERSION + 1))
        columns = {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
        indexes = {r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall()}
    assert {"host", "pid_namespace", "pid", "process_started", "heartbeat_at"} <= columns
    assert "coactivation_run" not in indexes and "expert_stats_run" in indexes  # v5 dropped only the big one
    runs = store.list_runs(store_path).set_index("run_id")
    assert runs.status.to_dict() == {"done0000000a": "complete", "dead0000000b": "interrupted"}
    assert store.layer_stats(store_path, ["done0000000a"]).tokens.tolist() == [10]
    new = store.begin_run(store_path, model_id="m", model_fingerprint="f", model_type="", domain="x", source="s",
                          settings={}, tool_version="t")
    assert store.list_runs(store_path).set_index("run_id").loc[new, "status"] == "running"


# -- store path validation -----------------------------------------------------------

def _tree_state(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def _one_line_refusal(path, write, match):
    with pytest.raises(MoeVizError) as info:
        store.check_store_path(path, write=write)
    assert "\n" not in str(info.value) and match in str(info.value), str(info.value)


def test_store_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file.txt").write_text("hello")
    before = _tree_state(tmp_path)
    for write in (True, False):
        _one_line_refusal(tmp_path / "file.txt" / "store.duckdb", write, "file.txt is a file, not a directory")
        _one_line_refusal(tmp_path / "file.txt" / "deeper" / "store.duckdb", write, "is a file, not a directory")
    _one_line_refusal("/etc/hosts/x.duckdb", True, "/etc/hosts is a file")
    assert _tree_state(tmp_path) == before


def test_files_that_are_not_moe_viz_stores_are_refused_untouched(tmp_path):
    text = tmp_path / "notes.duckdb"
    text.write_bytes(b"just some text\n" * 100)
    empty = tmp_path / "empty.duckdb"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.duckdb"
    with duckdb.connect(str(foreign)) as con:
        con.execute("CREATE TABLE people (name VARCHAR)")
        con.execute("INSERT INTO people VALUES ('ada')")
    lookalike = tmp_path / "lookalike.duckdb"  # a schema_version table, but someone else's
    with duckdb.connect(str(lookalike)) as con:
        con.execute("CREATE TABLE schema_version (name VARCHAR, applied VARCHAR)")
    half = tmp_path / "half.duckdb"  # moe_viz's version table without moe_viz's tables
    with duckdb.connect(str(half)) as con:
        con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP NOT NULL)")
        con.execute("INSERT INTO schema_version VALUES (1, now()::TIMESTAMP)")
    directory = tmp_path / "adir.duckdb"
    directory.mkdir()
    before = _tree_state(tmp_path)
    for write in (True, False):
        _one_line_refusal(text, write, "is not a DuckDB database")
        _one_line_refusal(empty, write, "is not a DuckDB database")
        _one_line_refusal(foreign, write, "not a moe_viz store (tables people, no schema_version)")
        _one_line_refusal(lookalike, write, "not a moe_viz store")
        _one_line_refusal(half, write, "not a moe_viz store (missing tables coactivation, expert_stats")
        _one_line_refusal(directory, write, "is a directory")
    # writing through the store API is refused too: moe_viz never migrates its tables into someone's database
    with pytest.raises(MoeVizError, match="not a moe_viz store"):
        store.begin_run(foreign, model_id="m", model_fingerprint="f", model_type="", domain="d", source="s",
                        settings={}, tool_version="t")
    after = _tree_state(tmp_path)
    assert {k: v for k, v in after.items() if not k.endswith(".writer-lock")} == before
    with duckdb.connect(str(foreign), read_only=True) as con:
        assert con.execute("SELECT table_name FROM duckdb_tables()").fetchall() == [("people",)]


def test_good_store_paths_pass_and_create_nothing(tmp_path, store_path, model_and_tokenizer):
    assert store.check_store_path(tmp_path / "new" / "dir" / "s.duckdb", write=True)
    assert not (tmp_path / "new").exists()
    _one_line_refusal(tmp_path / "new" / "s.duckdb", False, "no store at")
    model, tokenizer = model_and_tokenizer
    _capture(model, tokenizer, store_path)
    for write in (True, False):
        assert store.check_store_path(store_path, write=write) == store_path


def test_cli_refuses_bad_stores_before_loading_anything(tmp_path, capsys):
    from moe_viz.cli import main
    from moe_viz.prune.export import PRUNE_MANIFEST
    from tiny_models import save_tiny_model

    (tmp_path / "file.txt").write_text("x")
    bad = str(tmp_path / "file.txt" / "store.duckdb")
    text = tmp_path / "code.txt"
    text.write_text(TEXT)
    # verify first checks the export's manifest and source files (cheap, nothing loaded), then the store
    model = save_tiny_model(tmp_path / "model")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / PRUNE_MANIFEST).write_text(json.dumps({"source_model": str(model), "plan": {}}))
    commands = [
        # the model does not exist either: the store error proves the store is checked first
        ["capture", "--model", str(tmp_path / "no-model"), "--domain", f"code={text}", "--store", bad],
        ["prune", "--model", str(tmp_path / "no-model"), "--criterion", "frequency", "--keep", "2",
         "--out", str(tmp_path / "out"), "--store", bad],
        ["verify", str(tmp_path / "export"), "--store", bad],
        ["import-run", str(tmp_path / "no-run"), "--store", bad],
    ]
    before = _tree_state(tmp_path)
    capsys.readouterr()  # what saving the model printed
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "file.txt is a file, not a directory" in err, (argv, err)
    assert _tree_state(tmp_path) == before


READ_ONLY_PROBE = """
import os, sys
sys.path.insert(0, sys.argv[1])
from moe_viz.store_location import location_problem
ro = sys.argv[2]
assert os.geteuid() != 0
try:
    open(os.path.join(ro, "probe"), "w")
    print("WRITABLE")
except PermissionError:
    pass
for path, write in [(os.path.join(ro, "s.duckdb"), True), (os.path.join(ro, "sub", "s.duckdb"), True),
                    (os.path.join(ro, "existing.duckdb"), True), (os.path.join(ro, "existing.duckdb"), False)]:
    print(repr(location_problem(path, write)))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to switch to an unprivileged user), setpriv and a system python3")
def test_read_only_directory_is_refused_for_a_user_who_cannot_write_there():
    """Root writes anywhere, so the directory is made read-only for `nobody` and the check runs as nobody.

    The check itself needs only the standard library (moe_viz.store_location), which is
    what lets it run in the system python3 that nobody can execute.
    """
    top = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        top.chmod(0o755)
        ro = top / "ro"
        ro.mkdir()
        with duckdb.connect(str(ro / "existing.duckdb")) as con:
            con.execute("CREATE TABLE t (x INTEGER)")
        (ro / "existing.duckdb").chmod(0o644)
        ro.chmod(0o555)
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", READ_ONLY_PROBE,
             str(root), str(ro)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert "WRITABLE" not in lines  # really read-only for that user
        assert f"directory {ro} is not writable" in lines[0]
        assert f"directory {ro} is not writable" in lines[1]  # the nearest existing ancestor decides
        assert "existing.duckdb is read-only" in lines[2]
        assert lines[3] == "None"  # reading a store in a read-only directory is fine
    finally:
        (top / "ro").chmod(0o755) if (top / "ro").exists() else None
        shutil.rmtree(top)


UNPRIVILEGED_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from moe_viz.store_location import location_problem
for path in sys.argv[2:]:
    for write in (True, False):
        print(repr(location_problem(path, write)))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to switch to an unprivileged user), setpriv and a system python3")
def test_own_store_in_a_read_only_directory_and_an_unreadable_store_are_refused():
    """Run as `nobody`: a store nobody may write, in a directory it may not (no room for the .wal); a store it cannot read."""
    top = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        top.chmod(0o755)
        ro = top / "ro"
        ro.mkdir()
        mine, secret = ro / "mine.duckdb", ro / "secret.duckdb"
        for path in (mine, secret):
            with duckdb.connect(str(path)) as con:
                con.execute("CREATE TABLE t (x INTEGER)")
        os.chown(mine, 65534, 65534)
        mine.chmod(0o644)
        secret.chmod(0o600)
        ro.chmod(0o555)
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
             UNPRIVILEGED_PROBE, str(root), str(mine), str(secret)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            repr(f"store {mine}: directory {ro} is not writable (DuckDB writes mine.duckdb.wal there)"),
            repr(None),  # reading needs no .wal
            repr(f"store {secret} is not readable"),
            repr(f"store {secret} is not readable"),
        ]
    finally:
        (top / "ro").chmod(0o755) if (top / "ro").exists() else None
        shutil.rmtree(top)


def test_location_checks_read_the_header_where_duckdb_writes_it_and_never_follow_a_dangling_link(tmp_path):
    from moe_viz.store_location import location_problem

    shifted = tmp_path / "shifted.duckdb"
    shifted.write_bytes(b"DUCK" + bytes(60))  # the magic bytes, but not at DuckDB's offset 8
    dangling = tmp_path / "dangling.duckdb"
    dangling.symlink_to(tmp_path / "gone" / "target.duckdb")  # writing would create a file elsewhere
    for write in (True, False):
        assert location_problem(shifted, write) == (f"store {shifted} is not a DuckDB database (no DuckDB header): "
                                                    "choose another --store")
        assert location_problem(dangling, write) == f"store {dangling} is not a regular file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.duckdb", "shifted.duckdb"]


# -- connections: one DuckDB instance per process, the file attached while in use --------------

OPEN_READ_WRITE = "import duckdb, sys; duckdb.connect(sys.argv[1]).close(); print('opened')"


def _write_one_run(path) -> str:
    return store.begin_run(path, model_id="m", model_fingerprint="f", model_type="qwen3_moe", domain="d",
                           source="s", settings={}, tool_version="t")


def test_a_closed_connection_leaves_the_file_unlocked_and_checkpointed(store_path):
    """Another process can open the store read-write right after a write, and no WAL is left behind:
    the file is detached (lock released, checkpointed) when the last connection closes."""
    _write_one_run(store_path)
    assert not Path(str(store_path) + ".wal").exists()
    opened = subprocess.run([sys.executable, "-c", OPEN_READ_WRITE, str(store_path)], capture_output=True, text=True)
    assert opened.stdout.strip() == "opened", opened.stderr
    with store.connect(store_path, read_only=True):
        held = subprocess.run([sys.executable, "-c", OPEN_READ_WRITE, str(store_path)], capture_output=True, text=True)
    assert "lock" in held.stderr.lower()  # while a connection is open, the file is really held


def test_a_commit_is_checkpointed_into_the_file_at_once(store_path, tmp_path):
    """A commit writes its rows into the database file itself, not first into the .wal (to be copied
    again at DETACH): a copy of the file alone, taken while the connection is still open, has them."""
    run_id = _write_one_run(store_path)
    with store.connect(store_path) as con:
        con.execute("UPDATE runs SET domain = 'changed' WHERE run_id = ?", [run_id])
        wal = Path(str(store_path) + ".wal")
        assert not wal.exists() or wal.stat().st_size == 0
        shutil.copyfile(store_path, tmp_path / "copy.duckdb")
    copy = duckdb.connect(str(tmp_path / "copy.duckdb"), read_only=True)
    try:
        assert copy.execute("SELECT domain FROM runs").fetchall() == [("changed",)]
    finally:
        copy.close()


def test_connections_of_one_process_share_the_attachment(store_path):
    """Nested connections (a read inside a write, as a thread beside a writer does) see the committed rows;
    a write while this process has the file read-only waits like for another process's lock."""
    run_id = _write_one_run(store_path)
    with store.connect(store_path) as writer:
        writer.execute("UPDATE runs SET domain = 'changed' WHERE run_id = ?", [run_id])
        assert store.list_runs(store_path).domain.tolist() == ["changed"]  # shares the read-write attachment
    with store.connect(store_path, read_only=True):
        with pytest.raises(store.StoreLockedError):
            with store.connect(store_path, timeout=0.2):
                pass
    with store.connect(store_path, read_only=True):  # and the same path spelled another way is the same file
        spelled = Path(store_path).parent / "." / Path(store_path).name
        assert store.list_runs(spelled).run_id.tolist() == [run_id]
    with store.connect(store_path) as con:  # everything was detached: read-write works again
        assert con.execute("SELECT domain FROM runs").fetchall() == [("changed",)]


def test_a_store_this_process_opened_with_duckdb_itself_is_still_readable(store_path):
    """A notebook's own duckdb.connect of the store must not lock moe_viz out of it."""
    run_id = _write_one_run(store_path)
    with duckdb.connect(str(store_path)) as own:
        assert store.list_runs(store_path).run_id.tolist() == [run_id]
        own.execute("UPDATE runs SET domain = 'notebook'")
        assert store.list_runs(store_path).domain.tolist() == ["notebook"]


def test_a_forked_child_opens_the_store_with_an_instance_of_its_own(store_path):
    import multiprocessing

    run_id = _write_one_run(store_path)
    with store.connect(store_path, read_only=True):  # the parent holds an attachment while it forks
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            seen = pool.apply(_runs_in_child, (str(store_path),))
    assert seen == [run_id]


def _runs_in_child(path: str) -> list[str]:
    return store.list_runs(path).run_id.tolist()


def _sigint_in_child() -> tuple[int, bool]:
    return store._sigint.depth, signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_forked_child_does_not_inherit_its_parents_held_ctrl_c(store_path):
    """The parent holds SIGINT while its connection is open; a child forked then has no connection, so its
    Ctrl-C must not be held (it would be, for good, with the parent's hold count)."""
    import multiprocessing

    _write_one_run(store_path)
    default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with store.connect(store_path, read_only=True):
        assert store._sigint.depth == 1
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply(_sigint_in_child) == (0, default)
    assert store._sigint.depth == 0 and (signal.getsignal(signal.SIGINT) is signal.default_int_handler) == default


SIGINT_CHILD = r"""
import os, random, signal, subprocess, sys, threading
from moe_viz import store

path = sys.argv[1]
# A Ctrl-C while signals are held (nested holds) arrives once the outermost hold ends, never inside.
outer = store._sigint.hold()
inner = store._sigint.hold()
os.kill(os.getpid(), signal.SIGINT)
store._sigint.release(inner)
inside = "no interrupt inside"
try:
    store._sigint.release(outer)
    print("not delivered")
except KeyboardInterrupt:
    print(inside + ", delivered after")

# Ctrl-C at random moments of store reads and writes: whatever it interrupts, nothing stays attached.
random.seed(0)
interrupted = 0

for i in range(300):
    timer = threading.Timer(random.uniform(0, 0.004), os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        if i % 3:
            store.list_runs(path)
        else:
            store.heartbeat(path, "no-such-run")
    except KeyboardInterrupt:  # never DuckDB's own report of it (InterruptException, `std::bad_cast` from .df())
        interrupted += 1
    while True:  # until the timer fired and its signal was handled (it may land here, after the call)
        try:
            timer.join()
            for _ in range(1000):  # bytecodes at which a pending signal is handled
                pass
            break
        except KeyboardInterrupt:
            pass
attached = store._attachments._base.execute(
    "SELECT database_name FROM duckdb_databases() WHERE NOT internal").fetchall()
print(interrupted > 0, store._attachments._attached, attached)
"""


def test_ctrl_c_never_leaves_the_store_attached(store_path):
    """Interrupting store calls (a notebook survives Ctrl-C) leaves nothing attached: the file is unlocked."""
    _write_one_run(store_path)
    done = subprocess.run([sys.executable, "-c", SIGINT_CHILD, str(store_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "no interrupt inside, delivered after"
    assert lines[1] == "True {} [('memory',)]"
    opened = subprocess.run([sys.executable, "-c", OPEN_READ_WRITE, str(store_path)], capture_output=True, text=True)
    assert opened.stdout.strip() == "opened", opened.stderr


# -- what a completed run replaces, and runs saved to files ------------------------------------------

def test_a_completed_run_replaces_a_failed_run_with_the_same_settings_and_takes_the_final_settings(store_path):
    failed = register_run(store_path, settings={"seq_len": 8, "phase": "pending"})
    store.fail_run(store_path, failed, "RuntimeError: out of memory")
    other = register_run(store_path, settings={"seq_len": 16, "phase": "pending"})  # other settings: kept
    store.fail_run(store_path, other, "RuntimeError: out of memory")
    new = register_run(store_path, settings={"seq_len": 8, "phase": "pending"})
    store.complete_run(store_path, new, **run_frames(), tokens=8, sequences=2, settings_update={"phase": "done"})
    runs = store.list_runs(store_path).set_index("run_id")
    assert sorted(runs.index) == sorted([new, other])
    assert (runs.loc[new, "status"], runs.loc[other, "status"]) == ("complete", "failed")
    assert json.loads(runs.loc[new, "settings"]) == {"seq_len": 8, "phase": "done"}  # the update wins


def test_a_saved_run_whose_import_fails_keeps_its_files(store_path, tmp_path):
    run_id = register_run(store_path, settings={"seq_len": 8})
    saved = store.save_run_file(store_path, run_id, run_frames(), tokens=8, sequences=2)
    not_a_store = tmp_path / "notes.duckdb"
    not_a_store.write_text("my notes, not a store")
    with pytest.raises(MoeVizError):
        store.import_run_file(saved, not_a_store)
    assert not_a_store.read_text() == "my notes, not a store"
    assert sorted(p.name for p in saved.iterdir()) == [
        "coactivation.parquet", "expert_stats.parquet", "layer_stats.parquet", "run.json"]
    assert store.import_run_file(saved, store_path) == run_id  # still importable where it belongs
    got = store.expert_stats(store_path, [run_id]).drop(columns=["domain", "run_id", "recon_error"])
    pd.testing.assert_frame_equal(got, run_frames()["expert_stats"], check_dtype=False)
    assert not saved.exists()


SAVE_KILLED = """
import os, sys
import pandas as pd
from moe_viz import store
store._fsync = lambda path: os._exit(9)  # killed after the files are written, before they are published
frames = {"expert_stats": pd.DataFrame({"layer": [0], "expert": [0], "routed_tokens": [1]})}
store.save_run_file(sys.argv[1], "abc123def456", frames, tokens=1, sequences=1)
"""


def test_a_run_file_save_killed_midway_publishes_nothing_importable(store_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", SAVE_KILLED, str(store_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 9, done.stderr
    names = sorted(p.name for p in store.pending_dir(store_path).iterdir())
    assert len(names) == 1 and names[0].startswith(".abc123def456.partial-"), names
