"""The DuckDB store of capture runs and their statistics (schema: docs/STORE.md).

DuckDB lets only one process hold a file read-write, and that blocks every
reader. So nothing here keeps a connection open: each write opens the file,
commits one short transaction and closes it, and every open retries while
another process holds the lock. A dashboard can therefore read while a
capture runs; it only waits for the few milliseconds of each commit.

Writers do not starve behind readers that poll in a tight loop: a writer first
takes an exclusive flock on a small sidecar file (STORE.writer-lock) and holds
it until its connection closes; readers pass that gate before each open, so
while a writer waits no new reader opens the file and the current ones finish
within one short read.

A run records where it runs (host, pid, the process's start time) and a
heartbeat; `list_runs` reports a `running` run whose process is gone as
`interrupted` (see docs/STORE.md).
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import random
import shlex
import shutil
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import pandas as pd
import psutil

from moe_viz.errors import MoeVizError
# default_store is re-exported: store.default_store() is the one public name for the default store path
from moe_viz.store_location import default_store, location_problem  # noqa: F401

try:
    import fcntl
except ImportError:  # Windows: no writer gate, plain retries
    fcntl = None


LOCK_TIMEOUT_S = 60.0
# complete_run waits this long for the lock before saving the run to a file
# (MOE_VIZ_COMMIT_TIMEOUT overrides it; so does complete_run(lock_timeout=...)).
COMMIT_LOCK_TIMEOUT_S = 600.0
HEARTBEAT_INTERVAL_S = 30.0  # a capture refreshes its run's heartbeat_at this often
HEARTBEAT_LOCK_TIMEOUT_S = 5.0  # a heartbeat that cannot get the lock is skipped
# A `running` run on another host whose heartbeat is older than this is `interrupted`
# (generous: covers clock skew between hosts and long lock waits).
HEARTBEAT_STALE_S = 600.0
READER_GATE_WAIT_S = 10.0  # a reader waits at most this long for a waiting writer, then opens anyway

# Forward-only migrations: version -> statements. Never edit a shipped entry;
# add a new version instead.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            model_id VARCHAR NOT NULL,
            model_fingerprint VARCHAR NOT NULL,
            model_type VARCHAR,
            domain VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            settings VARCHAR NOT NULL,      -- JSON: seq_len, max_tokens, seed, dtype, device, ...
            settings_key VARCHAR NOT NULL,  -- hash of (fingerprint, domain, source, settings)
            status VARCHAR NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
            tokens BIGINT,
            sequences BIGINT,
            num_moe_layers INTEGER,
            error VARCHAR,
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            tool_version VARCHAR NOT NULL
        )""",
        """CREATE TABLE expert_stats (
            run_id VARCHAR NOT NULL,
            layer INTEGER NOT NULL,
            expert INTEGER NOT NULL,
            routed_tokens BIGINT NOT NULL,
            top1_tokens BIGINT NOT NULL,
            top1_prob_sum DOUBLE NOT NULL,
            gate_sum DOUBLE NOT NULL,
            prob_sum DOUBLE NOT NULL,
            ean_sum DOUBLE NOT NULL,
            ean_sq_sum DOUBLE NOT NULL,
            ean_max DOUBLE NOT NULL,
            reap_sum DOUBLE NOT NULL,
            contribution_sum DOUBLE NOT NULL
        )""",
        """CREATE TABLE layer_stats (
            run_id VARCHAR NOT NULL,
            layer INTEGER NOT NULL,
            module VARCHAR NOT NULL,
            tokens BIGINT NOT NULL,
            num_experts INTEGER NOT NULL,
            top_k INTEGER NOT NULL,
            router_score VARCHAR NOT NULL,
            entropy_mean DOUBLE NOT NULL
        )""",
        """CREATE TABLE coactivation (
            run_id VARCHAR NOT NULL,
            layer INTEGER NOT NULL,
            expert_a INTEGER NOT NULL,
            expert_b INTEGER NOT NULL,
            tokens BIGINT NOT NULL
        )""",
        "CREATE INDEX expert_stats_run ON expert_stats (run_id, layer)",
        "CREATE INDEX layer_stats_run ON layer_stats (run_id)",
        "CREATE INDEX coactivation_run ON coactivation (run_id, layer)",
    ],
    # Where a run's process runs, so that readers can tell a live run from one whose process died.
    2: [
        "ALTER TABLE runs ADD COLUMN host VARCHAR",           # socket.gethostname()
        "ALTER TABLE runs ADD COLUMN pid_namespace VARCHAR",  # boot id + pid namespace: where `pid` means something
        "ALTER TABLE runs ADD COLUMN pid INTEGER",
        "ALTER TABLE runs ADD COLUMN process_started DOUBLE",  # the process's start time (epoch s), tells pid reuse apart
        "ALTER TABLE runs ADD COLUMN heartbeat_at TIMESTAMP",  # UTC, refreshed while the capture runs
    ],
    # Plan evaluations (moe_viz/prune/sweep.py): one row per evaluated plan and evaluation domain.
    3: [
        """CREATE TABLE plan_evals (
            plan_key VARCHAR NOT NULL,       -- hash(model fingerprint, kept experts, bootstrap seed)
            eval_domain VARCHAR NOT NULL,
            eval_set VARCHAR NOT NULL,       -- hash of the evaluation tokens
            model_id VARCHAR NOT NULL,
            model_fingerprint VARCHAR NOT NULL,
            criterion VARCHAR NOT NULL,
            scope VARCHAR NOT NULL,
            sparsity DOUBLE NOT NULL,        -- fraction of routed experts the plan removes
            domains VARCHAR NOT NULL,        -- JSON: calibration domain -> weight
            plan VARCHAR NOT NULL,           -- the plan's JSON (PrunePlan.to_json)
            seed INTEGER NOT NULL,
            tokens BIGINT NOT NULL,
            sequences INTEGER NOT NULL,
            nll_original DOUBLE NOT NULL,
            nll_pruned DOUBLE NOT NULL,
            kl DOUBLE NOT NULL,
            top1_agreement DOUBLE NOT NULL,
            kl_ci_low DOUBLE NOT NULL,
            kl_ci_high DOUBLE NOT NULL,
            nll_delta_ci_low DOUBLE NOT NULL,
            nll_delta_ci_high DOUBLE NOT NULL,
            top1_agreement_ci_low DOUBLE NOT NULL,
            top1_agreement_ci_high DOUBLE NOT NULL,
            created_at TIMESTAMP NOT NULL,
            tool_version VARCHAR NOT NULL,
            PRIMARY KEY (plan_key, eval_set)
        )""",
        "CREATE INDEX plan_evals_model ON plan_evals (model_id)",
    ],
    # Causal importance (moe_viz/analysis/importance.py): measured after a capture, on its calibration tokens.
    4: [
        "ALTER TABLE expert_stats ADD COLUMN recon_error DOUBLE",  # NULL until `moe-viz importance` measures it
        """CREATE TABLE expert_knockout (
            run_id VARCHAR NOT NULL,
            layer INTEGER NOT NULL,
            expert INTEGER NOT NULL,
            eval_set VARCHAR NOT NULL,       -- hash of the evaluation tokens
            tokens BIGINT NOT NULL,
            kl DOUBLE NOT NULL,              -- mean KL(original || expert masked) per token
            kl_ci_low DOUBLE NOT NULL,
            kl_ci_high DOUBLE NOT NULL,
            created_at TIMESTAMP NOT NULL,
            PRIMARY KEY (run_id, layer, expert, eval_set)
        )""",
    ],
    # A 94-layer x 512-expert top-8 run has ~12.3M co-activation rows. Their ART index made writing a
    # run ~5x slower and deleting a replaced run (a re-capture) take ~18 s (bench/store_write.py). A run's
    # rows are written together in layer order, so DuckDB's min/max zone maps find (run, layer) without it.
    5: ["DROP INDEX IF EXISTS coactivation_run"],
    # Token-level routing traces (moe_viz/capture/trace.py): the first N calibration tokens of a run.
    6: [
        """CREATE TABLE token_routes (
            run_id VARCHAR NOT NULL,
            seq INTEGER NOT NULL,            -- calibration sequence (capture order; .jsonl input_ids: the record)
            pos INTEGER NOT NULL,            -- position in that sequence
            token_id INTEGER NOT NULL,
            layer SMALLINT NOT NULL,         -- decoder layer index, as in expert_stats
            slot SMALLINT NOT NULL,          -- 0..k-1, the order the router returned
            expert SMALLINT NOT NULL,
            gate REAL NOT NULL,              -- the weight the model applied to this expert's output
            gate_rank SMALLINT NOT NULL      -- rank of this gate among the token's k (0: largest = top-1; ties by slot)
        )""",
        """CREATE TABLE run_tokens (
            run_id VARCHAR NOT NULL,
            seq INTEGER NOT NULL,
            pos INTEGER NOT NULL,
            token_id INTEGER NOT NULL
        )""",
        """CREATE TABLE token_pieces (
            run_id VARCHAR NOT NULL,
            token_id INTEGER NOT NULL,
            piece VARCHAR NOT NULL           -- tokenizer.decode([token_id])
        )""",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)
STAT_TABLES = ("expert_stats", "layer_stats", "coactivation")  # written by a capture
TRACE_TABLES = ("token_routes", "run_tokens", "token_pieces")  # written by a capture with a token trace
RUN_TABLES = STAT_TABLES + ("expert_knockout",) + TRACE_TABLES  # every table whose rows belong to a run


def tables_at(version: int) -> frozenset[str]:
    """The tables a store at schema `version` has: those its migrations created."""
    created = {m.group(1) for v in range(1, version + 1) for statement in MIGRATIONS.get(v, [])
               if (m := re.match(r"\s*CREATE TABLE (\w+)", statement))}
    return frozenset({"schema_version", *created})


STORE_TABLES = tables_at(SCHEMA_VERSION)
RUN_STATUSES = ("running", "complete", "failed", "interrupted")  # `interrupted` is derived on read


class StoreLockedError(MoeVizError):
    """The store stayed locked by other processes for the whole timeout."""


class RunSavedToFile(MoeVizError):
    """complete_run could not get the lock; the run's rows were saved to `self.saved` instead."""

    def __init__(self, message: str, saved: Path):
        super().__init__(message)
        self.saved = saved


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    # The first also covers this process's own read-only attachment when a write wants the file
    # (_Attachments.open). The second: another DuckDB instance of this process (a notebook's
    # duckdb.connect) has the file open in the other mode; like another process's lock, it ends
    # when that closes.
    return ("lock" in text and ("conflict" in text or "could not set" in text)) or "different configuration" in text


def _gate_path(path: Path) -> Path:
    return path.with_name(path.name + ".writer-lock")


_gate_state = threading.local()  # writer gates this thread holds (so nested opens do not wait on themselves)


def _holding_gate(path: Path) -> bool:
    return str(path.absolute()) in getattr(_gate_state, "held", set())


@contextmanager
def _writer_gate(path: Path, deadline: float, timeout: float) -> Iterator[None]:
    """Hold the writer gate (exclusive flock on STORE.writer-lock) for the duration.

    While it is held, readers do not open the store (see _wait_for_writers), so
    a writer waiting for DuckDB's lock only waits for the reads already under way.
    Writers queue on the gate among themselves too.
    """
    fd = None
    if fcntl is not None and not _holding_gate(path):
        try:
            fd = os.open(_gate_path(path), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            pass  # e.g. a read-only directory: DuckDB will say what is wrong
    if fd is None:
        yield
        return
    try:
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(f"store {path} stayed locked by another process for {timeout:.0f}s") from None
                time.sleep(random.uniform(0.5, 1.5) * delay)  # another writer: usually one short commit
                delay = min(delay * 1.5, 0.02)
        held = _gate_state.__dict__.setdefault("held", set())
        key = str(path.absolute())
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _wait_for_writers(path: Path, deadline: float) -> None:
    """Return once no writer holds the gate (or after READER_GATE_WAIT_S: a writer stuck
    behind some other program's lock must not lock readers out for long)."""
    if fcntl is None or _holding_gate(path):
        return
    try:
        fd = os.open(_gate_path(path), os.O_RDONLY)
    except OSError:
        return  # no writer has ever written here, or the directory is not ours to read
    try:
        limit = min(deadline, time.monotonic() + READER_GATE_WAIT_S)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)  # only a test: readers never hold the gate
                return
            except BlockingIOError:
                if time.monotonic() >= limit:
                    return
                time.sleep(0.003)
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def duckdb_threads() -> int:
    """DuckDB worker threads of this process's store instance: $MOE_VIZ_DUCKDB_THREADS, else half the usable CPUs.

    Every query of every process runs on that many threads. With DuckDB's default (all CPUs), two dashboards
    polling without pause kept 4 threads busy on a 2-core machine and slowed a
    capture there 2.3x; with 1 thread, 1.4x (docs/BENCHMARKS.md).
    """
    value = os.environ.get("MOE_VIZ_DUCKDB_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise MoeVizError(f"MOE_VIZ_DUCKDB_THREADS={value!r} must be a positive integer")
        return int(value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


class _Attachments:
    """Store files attached to this process's one in-memory DuckDB instance.

    Starting a DuckDB database instance costs ~10 ms of CPU (a `duckdb.connect` of an
    empty in-memory database, measured here), more than most store queries; ATTACH +
    DETACH of the file costs ~1 ms, takes and releases the same file lock, and DETACH
    checkpoints as a close does. So a store connection is a cursor of one long-lived
    in-memory instance, with the file attached while any connection to it is open:
    threads share an attachment (counted), and a thread that needs the other mode
    (read-write while it is attached read-only) waits for it as for another process's
    lock. A reader may share a read-write attachment: it sees what is committed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._base: duckdb.DuckDBPyConnection | None = None
        self._attached: dict[str, list] = {}  # file -> [alias, read_only, open connections]
        self._holds: dict[int, bool] = {}  # id(connection) -> whether its open holds SIGINT (_SigintHold)
        self._aliases = 0

    def _instance(self) -> duckdb.DuckDBPyConnection:
        if self._pid != os.getpid():  # a forked child must not touch its parent's instance
            self._base, self._attached, self._holds, self._pid = None, {}, {}, os.getpid()
        if self._base is None:
            # checkpoint_threshold 0: a commit that changed data checkpoints at once (when no other
            # transaction is open) instead of writing the rows to the .wal first and again at DETACH
            # (the same checkpoint, so the same durability): 65k trace rows committed + detached in
            # 13 ms instead of 18 ms.
            self._base = duckdb.connect(":memory:", config={"threads": duckdb_threads(), "checkpoint_threshold": "0b"})
        return self._base

    def open(self, path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A connection whose default database is the store at `path`; give it back with `close`.

        From here until `close` has released it, SIGINT is held (`_sigint`): the connection is
        always given back whole, and the Ctrl-C is delivered then.
        """
        key = os.path.realpath(path)  # DuckDB allows one attachment per file, however it is spelled
        held = _sigint.hold()
        try:
            with self._lock:
                base = self._instance()
                entry = self._attached.get(key)
                if entry is not None and entry[1] and not read_only:
                    raise duckdb.IOException(f"Could not set lock on file {key}: this process has it attached read-only")
                if entry is None:
                    self._aliases += 1
                    alias = f"moe_viz_store_{self._aliases}"
                    quoted = key.replace("'", "''")
                    base.execute(f"ATTACH '{quoted}' AS {alias}" + (" (READ_ONLY)" if read_only else ""))
                    entry = self._attached[key] = [alias, read_only, 0]
                entry[2] += 1
                try:
                    con = base.cursor()
                    con.execute(f"USE {entry[0]}")
                except BaseException:
                    self._release(key)
                    raise
                self._holds[id(con)] = held
        except BaseException:
            _sigint.release(held)
            raise
        return con

    def close(self, path: Path, con: duckdb.DuckDBPyConnection) -> None:
        held = self._holds.pop(id(con), False)
        try:
            con.close()
            with self._lock:
                self._release(os.path.realpath(path))
        finally:
            _sigint.release(held)

    def _release(self, key: str) -> None:
        entry = self._attached[key]
        entry[2] -= 1
        if entry[2] == 0:
            self._base.execute(f"DETACH {entry[0]}")  # checkpoints a read-write attachment, releases the lock
            del self._attached[key]  # only once detached: if DETACH fails, the next open reuses the attachment


class _SigintHold:
    """SIGINT held in the main thread while any of its store connections is open; delivered after.

    A KeyboardInterrupt between an ATTACH and its bookkeeping, or between a connection's last query
    and its DETACH, would leave the file attached with no one to detach it: in a notebook that
    survives the Ctrl-C, the store would stay locked for every other process. One raised inside
    DuckDB's conversion of a result to pandas surfaces as `RuntimeError: std::bad_cast`. So from just
    before a connection attaches until it is released, a Ctrl-C is only noted, and the previous
    handler runs for it once the last connection is released. Store calls are short (the longest,
    writing a 94-layer run, takes seconds); waiting for a lock is not held. Python runs signal
    handlers in the main thread only, so other threads hold nothing.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self.previous = None
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child: its parent's connections are not its own, so nothing is held."""
        if self.depth:
            try:
                self._restore()
            except ValueError:  # forked from another thread: that thread's child cannot set handlers
                pass
        self.depth, self.pending = 0, False

    def _restore(self):
        """Put back the handler the outermost hold replaced (SIG_DFL where none was set from Python); return it."""
        previous = self.previous if self.previous is not None else signal.SIG_DFL
        signal.signal(signal.SIGINT, previous)
        return previous

    def _note(self, signum, frame) -> None:
        self.pending = True

    def hold(self) -> bool:
        """Start holding (holds nest); False where nothing is held (another thread or interpreter)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self.depth == 0:
            try:
                self.previous = signal.signal(signal.SIGINT, self._note)
            except ValueError:  # not the main interpreter
                return False
        self.depth += 1
        return True

    def release(self, held: bool) -> None:
        """End a hold; the outermost restores the handler and runs it for a Ctrl-C that came meanwhile."""
        if not held:
            return
        self.depth -= 1
        if self.depth:
            return
        previous = self._restore()
        if self.pending:
            self.pending = False
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)  # the default action, now that it is restored


_sigint = _SigintHold()


_attachments = _Attachments()


def _connect_once(path: Path, read_only: bool) -> tuple[duckdb.DuckDBPyConnection, bool]:
    """(connection, attached): attached to this process's instance unless another instance here has the file."""
    try:
        return _attachments.open(path, read_only), True
    except duckdb.Error as exc:
        if "unique file handle conflict" not in str(exc).lower():
            raise
    # This process already has the file open in a DuckDB instance of its own (e.g. a notebook's
    # duckdb.connect): connect to that instance, with its settings; a read may go through a
    # read-write instance. Anything else ("different configuration") waits like a lock.
    try:
        return duckdb.connect(str(path), read_only=read_only), False
    except duckdb.Error as exc:
        if not read_only or "different configuration" not in str(exc).lower():
            raise
    return duckdb.connect(str(path)), False


def _open(path: Path, read_only: bool, deadline: float, timeout: float) -> tuple[duckdb.DuckDBPyConnection, bool]:
    delay = 0.002 if not read_only else 0.01
    while True:
        if read_only:
            _wait_for_writers(path, deadline)
        try:
            return _connect_once(path, read_only)
        except duckdb.InterruptException as exc:  # DuckDB took the Ctrl-C: it stays one, not "cannot open store"
            raise KeyboardInterrupt from exc
        except (duckdb.IOException, duckdb.Error) as exc:
            if _is_lock_error(exc) and time.monotonic() < deadline:
                # Jittered, short: a writer holding the gate only waits for reads already under way.
                time.sleep(random.uniform(0.5, 1.5) * delay)
                delay = min(delay * 1.5, 0.05 if not read_only else 0.1)
                continue
            if _is_lock_error(exc):
                raise StoreLockedError(f"store {path} stayed locked by another process for {timeout:.0f}s") from exc
            raise MoeVizError(f"cannot open store {path}: {str(exc).splitlines()[0]}") from exc


@contextmanager
def connect(path: str | Path, read_only: bool = False, timeout: float = LOCK_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the store briefly; waits while another process holds the file.

    A write connection creates the file and applies pending migrations. A
    read-only connection to a missing file raises MoeVizError; so does a DuckDB
    file that is not a moe_viz store. StoreLockedError (a MoeVizError) if the
    file stays locked for `timeout` seconds.
    """
    path = Path(path)
    if read_only and not path.exists():
        raise MoeVizError(f"no store at {path}: run `moe-viz capture` or `moe-viz demo` first")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with nullcontext() if read_only else _writer_gate(path, deadline, timeout):
        con, attached = _open(path, read_only, deadline, timeout)
        try:
            _check_schema(con, path, migrate=not read_only)
            yield con
        finally:
            if attached:
                _attachments.close(path, con)
            else:
                con.close()


def _schema_version(con: duckdb.DuckDBPyConnection, path: Path, full: bool = True) -> int:
    """The store's schema version; 0 for a new, empty file. Refuses DuckDB files that are not stores.

    `full=False` (plain reads, which are frequent) trusts a moe_viz schema_version table
    without listing the tables: listing costs ~5 ms on a fresh connection.
    """
    if not full:
        try:
            version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            if isinstance(version, int) and version >= 1:
                return version
        except duckdb.ProgrammingError:  # not duckdb.Error: an interrupted query (Ctrl-C) must not be swallowed
            pass  # no (or someone else's) schema_version: the full check says which
    tables = {r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
    if not tables:
        return 0
    if "schema_version" not in tables:
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise MoeVizError(f"{path} is a DuckDB database but not a moe_viz store (tables {listed}, no schema_version): "
                          "choose another --store")
    try:
        version = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    except duckdb.ProgrammingError:
        version = None
    missing = sorted(tables_at(version) - tables) if isinstance(version, int) else []
    if not isinstance(version, int) or version < 1 or (missing and version <= SCHEMA_VERSION):
        detail = f"missing tables {', '.join(missing)}" if missing else "its schema_version table is not moe_viz's"
        raise MoeVizError(f"{path} is a DuckDB database but not a moe_viz store ({detail}): choose another --store")
    return version


def _check_schema(con: duckdb.DuckDBPyConnection, path: Path, migrate: bool) -> None:
    # A store already at this version needs no table listing (~5 ms of every write); anything else gets the full check.
    version = _schema_version(con, path, full=False)
    if migrate and version != SCHEMA_VERSION:
        version = _schema_version(con, path, full=True)
    if version > SCHEMA_VERSION:
        raise MoeVizError(f"store {path} has schema v{version}, newer than this moe_viz (v{SCHEMA_VERSION}): upgrade moe_viz")
    if version == SCHEMA_VERSION or not migrate:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP NOT NULL)")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [target, _now()])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def check_store_path(path: str | Path, write: bool) -> Path:
    """Fail early, with one line, if `path` cannot be a store to read (or write); changes nothing.

    Refused: a path under a regular file, a directory that is not writable (for
    writing), a file that is not a DuckDB database, a DuckDB file that is not a
    moe_viz store, or a store newer than this moe_viz. A missing file is fine for
    writing (it is created on the first write), an error for reading.
    """
    path = Path(path)
    problem = location_problem(path, write)
    if problem:
        raise MoeVizError(problem)
    if path.exists():
        with connect(path, read_only=True) as con:  # refuses newer schemas
            _schema_version(con, path, full=True)  # and DuckDB files that are not moe_viz stores
    return path


def settings_key(model_id: str, fingerprint: str, domain: str, source: str, settings: dict) -> str:
    # Where and how a capture ran (device, ranks, layer by layer) does not change what it measures: not in the key.
    keyed = {k: v for k, v in settings.items() if k not in ("device", "world_size", "layerwise", "capture_phase")}
    payload = json.dumps([model_id, fingerprint, domain, source, keyed], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _pid_namespace() -> str:
    """Boot id and pid namespace of this process: a pid names the same process only within both."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{boot}/{namespace}"


def _process_identity() -> dict:
    return {
        "host": socket.gethostname(),
        "pid_namespace": _pid_namespace(),
        "pid": os.getpid(),
        "process_started": psutil.Process().create_time(),
    }


# Rows of the runs this process registered, so that complete_run can save a
# self-contained file when it cannot reach the store.
_registered: dict[str, dict] = {}


def begin_run(
    path: str | Path,
    *,
    model_id: str,
    model_fingerprint: str,
    model_type: str,
    domain: str,
    source: str,
    settings: dict,
    tool_version: str,
) -> str:
    """Register a run as `running` (with this process's host, pid, start time and a heartbeat); return its id."""
    run_id = uuid.uuid4().hex[:12]
    now = _now()
    row = {
        "run_id": run_id,
        "model_id": model_id,
        "model_fingerprint": model_fingerprint,
        "model_type": model_type,
        "domain": domain,
        "source": source,
        "settings": json.dumps(settings, sort_keys=True),
        "settings_key": settings_key(model_id, model_fingerprint, domain, source, settings),
        "status": "running",
        "started_at": now,
        "tool_version": tool_version,
        **_process_identity(),
        "heartbeat_at": now,
    }
    with connect(path) as con:
        _insert_run_row(con, row)
    _registered[run_id] = row
    return run_id


def _insert_run_row(con: duckdb.DuckDBPyConnection, row: dict) -> None:
    columns = list(row)
    con.execute(f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                [row[c] for c in columns])


def heartbeat(path: str | Path, run_id: str, timeout: float = HEARTBEAT_LOCK_TIMEOUT_S) -> None:
    """Refresh a running run's heartbeat_at (one short write; StoreLockedError if locked for `timeout`)."""
    with connect(path, timeout=timeout) as con:
        con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND status = 'running'", [_now(), run_id])


def _commit_timeout(lock_timeout: float | None) -> float:
    if lock_timeout is not None:
        return lock_timeout
    value = os.environ.get("MOE_VIZ_COMMIT_TIMEOUT")
    try:
        return float(value) if value else COMMIT_LOCK_TIMEOUT_S
    except ValueError:
        raise MoeVizError(f"MOE_VIZ_COMMIT_TIMEOUT={value!r} must be a number of seconds") from None


def complete_run(
    path: str | Path,
    run_id: str,
    *,
    expert_stats: pd.DataFrame,
    layer_stats: pd.DataFrame,
    coactivation: pd.DataFrame,
    tokens: int,
    sequences: int,
    trace: dict[str, pd.DataFrame] | None = None,
    lock_timeout: float | None = None,
    settings_update: dict | None = None,
) -> None:
    """Write all of a run's rows and mark it complete, in one transaction.

    `trace`: the token-level trace frames (TRACE_TABLES -> frame, capture/trace.py), written in the
    same transaction. `settings_update`: keys merged into the run's settings JSON (what is only
    known at the end, e.g. the capture phase's throughput; never part of the settings key).

    Earlier runs with the same settings key (same model, domain, source and
    settings) are deleted in the same transaction, so a re-capture replaces
    the old data atomically.

    Waits up to `lock_timeout` seconds for the store (default COMMIT_LOCK_TIMEOUT_S,
    or $MOE_VIZ_COMMIT_TIMEOUT). If it stays locked, the run's rows are saved to
    a directory beside the store (see `pending_dir`) and RunSavedToFile says
    how to import them: the statistics are never thrown away.
    """
    frames = {"expert_stats": expert_stats, "layer_stats": layer_stats, "coactivation": coactivation}
    frames.update({table: trace[table] for table in TRACE_TABLES} if trace else {})
    timeout = _commit_timeout(lock_timeout)
    try:
        with connect(path, timeout=timeout) as con:
            _commit_run(con, run_id, frames, tokens, sequences, settings_update=settings_update)
    except StoreLockedError as exc:
        saved = save_run_file(path, run_id, frames, tokens, sequences, settings_update=settings_update)
        command = f"moe-viz import-run {shlex.quote(str(saved))} --store {shlex.quote(str(path))}"
        raise RunSavedToFile(
            f"store {path} stayed locked for {timeout:.0f}s, so run {run_id} was saved to {saved}; "
            f"import it with: {command}", saved) from exc
    _registered.pop(run_id, None)


def _commit_run(con: duckdb.DuckDBPyConnection, run_id: str, frames: dict[str, pd.DataFrame], tokens: int,
                sequences: int, row: dict | None = None, settings_update: dict | None = None) -> None:
    """The one transaction that completes a run (`row`: insert the run first if the store lacks it).

    Rows go in straight from the frames, run_id added by the INSERT itself: a
    12.3M-row co-activation frame given a run_id column first (`assign`) cost 0.4 s
    of the 1.8 s write (bench/store_write.py). DuckDB finds each frame as the local
    `incoming` (a replacement scan): register + unregister cost 0.6 ms per table,
    ~4 ms of a one-forward run's fixed cost (bench/capture_overhead.py --fixed).
    """
    con.execute("BEGIN TRANSACTION")
    try:
        found = con.execute("SELECT settings_key, status FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if found is None and row is None:
            raise MoeVizError(f"run {run_id} is not in the store")
        if found is None:
            _insert_run_row(con, row)
            found = (row["settings_key"], row["status"])
        old = [r[0] for r in con.execute(
            "SELECT run_id FROM runs WHERE settings_key = ? AND run_id <> ?", [found[0], run_id]
        ).fetchall()]
        _delete_runs(con, old)
        for table, frame in frames.items():
            if found[1] != "running":  # only a complete run has rows: an import repeated
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            incoming = frame  # noqa: F841 -- read by DuckDB's replacement scan of this frame's locals
            columns = ", ".join(f'"{c}"' for c in frame.columns if c != "run_id")
            con.execute(f"INSERT INTO {table} BY NAME SELECT ?::VARCHAR AS run_id, {columns} FROM incoming", [run_id])
        if settings_update:
            (settings,) = con.execute("SELECT settings FROM runs WHERE run_id = ?", [run_id]).fetchone()
            merged = {**json.loads(settings), **settings_update}
            con.execute("UPDATE runs SET settings = ? WHERE run_id = ?", [json.dumps(merged, sort_keys=True), run_id])
        con.execute(
            """UPDATE runs SET status = 'complete', tokens = ?, sequences = ?, num_moe_layers = ?,
                               finished_at = ?, error = NULL WHERE run_id = ?""",
            [tokens, sequences, len(frames["layer_stats"]), _now(), run_id],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


# -- runs saved to files when the store stayed locked --------------------------

PENDING_FORMAT = "moe_viz pending run"


def pending_dir(path: str | Path) -> Path:
    """Where complete_run saves runs it could not commit: STORE.pending/ beside the store."""
    path = Path(path)
    return path.with_name(path.name + ".pending")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_run_file(path: str | Path, run_id: str, frames: dict[str, pd.DataFrame], tokens: int,
                  sequences: int, settings_update: dict | None = None) -> Path:
    """Write a run's rows to STORE.pending/RUN_ID/ (Parquet per table + run.json), atomically.

    Written into a hidden temporary directory, fsynced, then renamed into place:
    the directory either holds everything or does not exist.
    """
    parent = pending_dir(path)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / run_id
    if final.exists():
        final = parent / f"{run_id}-{uuid.uuid4().hex[:6]}"
    tmp = parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with duckdb.connect() as mem:  # in-memory: writes Parquet without pyarrow
            for table, frame in frames.items():
                mem.register("frame", frame.assign(run_id=run_id))
                target = str(tmp / f"{table}.parquet").replace("'", "''")
                mem.execute(f"COPY frame TO '{target}' (FORMAT parquet)")
                mem.unregister("frame")
        row = _registered.get(run_id)
        meta = {
            "format": PENDING_FORMAT,
            "version": 1,
            "run_id": run_id,
            "store": str(Path(path).absolute()),
            "tokens": int(tokens),
            "sequences": int(sequences),
            "settings_update": settings_update or {},
            "saved_at": _now().isoformat(),
            "run": {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()} if row else None,
        }
        (tmp / "run.json").write_text(json.dumps(meta, indent=1))
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def import_run_file(saved: str | Path, path: str | Path) -> str:
    """Complete a run from a directory written by save_run_file; returns its run id.

    The same transaction as complete_run (older runs with the same settings are
    replaced); the run is inserted if the store lacks it. The directory is removed
    once the rows are committed.
    """
    saved = Path(saved)
    if saved.is_file() and saved.name == "run.json":
        saved = saved.parent
    try:
        meta = json.loads((saved / "run.json").read_text())
        if meta.get("format") != PENDING_FORMAT:
            raise ValueError("not a saved moe_viz run")
        run_id, tokens, sequences = str(meta["run_id"]), int(meta["tokens"]), int(meta["sequences"])
        frames = {}
        with duckdb.connect() as mem:
            for table in STAT_TABLES + TRACE_TABLES:
                if table in TRACE_TABLES and not (saved / f"{table}.parquet").exists():
                    continue  # a capture without a token trace
                frames[table] = mem.execute("SELECT * EXCLUDE (run_id) FROM read_parquet(?)",
                                            [str(saved / f"{table}.parquet")]).df()
    except (OSError, ValueError, KeyError, TypeError, duckdb.Error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoeVizError(f"{saved} is not a run saved by moe_viz ({reason})") from exc
    with connect(path) as con:
        _commit_run(con, run_id, frames, tokens, sequences, row=meta.get("run"),
                    settings_update=meta.get("settings_update") or None)
    shutil.rmtree(saved, ignore_errors=True)
    return run_id


def _delete_runs(con: duckdb.DuckDBPyConnection, run_ids: list[str]) -> None:
    if not run_ids:
        return
    for table in RUN_TABLES + ("runs",):
        con.execute(f"DELETE FROM {table} WHERE run_id IN (SELECT unnest(?))", [run_ids])


def fail_run(path: str | Path, run_id: str, error: str) -> None:
    """Mark a run failed; any rows it may have are removed."""
    with connect(path) as con:
        con.execute("BEGIN TRANSACTION")
        for table in RUN_TABLES:
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        con.execute(
            "UPDATE runs SET status = 'failed', error = ?, finished_at = ? WHERE run_id = ?",
            [error[:2000], _now(), run_id],
        )
        con.execute("COMMIT")
    _registered.pop(run_id, None)


def delete_runs(path: str | Path, run_ids: list[str]) -> None:
    """Remove runs and all their rows."""
    with connect(path) as con:
        con.execute("BEGIN TRANSACTION")
        _delete_runs(con, list(run_ids))
        con.execute("COMMIT")


# -- queries -----------------------------------------------------------------

def list_runs(path: str | Path, status: str | None = None) -> pd.DataFrame:
    """All runs, newest first (optionally only one status).

    `status` is as stored, except that a `running` run whose process is gone
    reads as `interrupted` (see run_is_live).
    """
    if status is not None and status not in RUN_STATUSES:
        raise MoeVizError(f"unknown run status {status!r}: one of {', '.join(RUN_STATUSES)}")
    stored = {"running", "interrupted"} if status in ("running", "interrupted") else {status}
    query = "SELECT * FROM runs" + (" WHERE status IN (SELECT unnest(?))" if status else "") + " ORDER BY started_at DESC"
    with connect(path, read_only=True) as con:
        runs = con.execute(query, [sorted(stored)] if status else []).df()
    if (runs.status == "running").any():
        now = _now()
        dead = [i for i, row in runs[runs.status == "running"].iterrows() if not run_is_live(row.to_dict(), now)]
        runs.loc[dead, "status"] = "interrupted"
    if status:
        runs = runs[runs.status == status].reset_index(drop=True)
    return runs


def _process_matches(pid, started) -> bool | None:
    """Is process `pid` (on this host) the one that started at `started`? None if it cannot be told."""
    try:
        process = psutil.Process(int(pid))
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # create_time is boot time + start ticks: equal for the same process; a reused pid started later.
        return abs(process.create_time() - float(started)) < 1.0
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, TypeError, ValueError):
        return None


def run_is_live(run: dict, now: datetime | None = None) -> bool:
    """Whether the process of a `running` run may still finish it.

    On the host (and pid namespace) that runs it: its pid is alive and started
    when the run's process did (a reused pid is not). Elsewhere: its heartbeat is
    younger than HEARTBEAT_STALE_S. A run without a recorded process (made before
    schema v2) is not live: a v1 moe_viz cannot write to a v2 store.
    """
    host = run.get("host")
    if not isinstance(host, str) or not host:
        return False
    if host == socket.gethostname() and run.get("pid_namespace") == _pid_namespace():
        verdict = _process_matches(run.get("pid"), run.get("process_started"))
        if verdict is not None:
            return verdict
    beat = run.get("heartbeat_at")
    if beat is None or pd.isna(beat):
        return False
    age = ((now or _now()) - pd.Timestamp(beat).to_pydatetime()).total_seconds()
    return age < HEARTBEAT_STALE_S


def _rows_of_runs(path: str | Path, table: str, run_ids: list[str], order: list[str],
                  columns: list[str] | None = None, layer: int | None = None) -> pd.DataFrame:
    """Rows of `table` for the given runs, in (run, *order) order, with run_id and domain as categoricals.

    On big stores most of a query's time went to converting rows to pandas. So
    the runs are joined by a small integer index instead of returning the run id
    string on every row, results come back as numpy arrays, and rows are sorted
    in numpy (only if the scan did not already return them in order).
    """
    run_ids = list(dict.fromkeys(run_ids))
    picked = "t.* EXCLUDE (run_id)" if columns is None else ", ".join(
        f"t.{c}" for c in dict.fromkeys([*order, *columns]) if c.isidentifier())
    with connect(path, read_only=True) as con:
        domains = dict(con.execute(
            "SELECT run_id, domain FROM runs WHERE run_id IN (SELECT unnest(?))", [run_ids]).fetchall())
        arrays = con.execute(
            f"""SELECT w.i::INTEGER AS run_index, {picked} FROM {table} t
                JOIN (SELECT unnest(?) AS run_id, unnest(range(len(?))) AS i) w USING (run_id)
                WHERE ? IS NULL OR t.layer = ?""",
            [run_ids, run_ids, layer, layer],
        ).fetchnumpy()
    codes = arrays.pop("run_index")
    key = codes.astype(np.int64)
    for column in order:  # one int64 key; scans usually come back in insertion order already
        key = key * (int(arrays[column].max(initial=0)) + 1) + arrays[column]
    if len(key) and not (key[1:] >= key[:-1]).all():
        sort = np.argsort(key, kind="stable")
        arrays = {name: values[sort] for name, values in arrays.items()}
        codes = codes[sort]
    frame = pd.DataFrame(arrays)
    names = [domains.get(r, "?") for r in run_ids]
    unique = list(dict.fromkeys(names))  # two runs may share a domain (e.g. two models)
    name_codes = np.array([unique.index(n) for n in names], dtype=np.int64)
    frame.insert(0, "run_id", pd.Categorical.from_codes(codes, categories=run_ids))
    frame.insert(0, "domain", pd.Categorical.from_codes(name_codes[codes] if len(codes) else codes, categories=unique))
    return frame


def expert_stats(path: str | Path, run_ids: list[str], columns: list[str] | None = None,
                 layer: int | None = None) -> pd.DataFrame:
    """Per-(run, layer, expert) rows of the given runs, with the run's domain.

    `columns` limits the statistics returned (on big stores most of a query's time is
    converting rows to pandas); `layer` limits the rows to one layer.
    """
    return _rows_of_runs(path, "expert_stats", run_ids, ["layer", "expert"], columns, layer)


def layer_stats(path: str | Path, run_ids: list[str]) -> pd.DataFrame:
    """Per-(run, layer) rows of the given runs, with the run's domain."""
    return _rows_of_runs(path, "layer_stats", run_ids, ["layer"])


def coactivation(path: str | Path, run_id: str, layer: int) -> pd.DataFrame:
    with connect(path, read_only=True) as con:
        return con.execute(
            "SELECT expert_a, expert_b, tokens FROM coactivation WHERE run_id = ? AND layer = ? ORDER BY 1, 2",
            [run_id, layer],
        ).df()


# -- causal importance ---------------------------------------------------------

def write_frame(path: str | Path, statements: list[tuple[str, list]], frame: pd.DataFrame) -> None:
    """Run (statement, params) pairs in one transaction, reading `frame` as the table `incoming`
    (a replacement scan, as in `_commit_run`)."""
    incoming = frame  # noqa: F841 -- read by DuckDB's replacement scan of this frame's locals
    with connect(path) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            for statement, params in statements:
                con.execute(statement, params)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def set_reconstruction(path: str | Path, run_id: str, scores: pd.DataFrame) -> None:
    """Store per-(layer, expert) `recon_error` for a complete run; every expert of the run must be given."""
    with connect(path, read_only=True) as con:
        expected = con.execute("SELECT count(*) FROM expert_stats WHERE run_id = ?", [run_id]).fetchone()[0]
    if expected == 0 or len(scores) != expected:
        raise MoeVizError(f"run {run_id} has {expected} experts in the store, the scores cover {len(scores)}")
    write_frame(path, [("""UPDATE expert_stats s SET recon_error = i.recon_error FROM incoming i
                      WHERE s.run_id = ? AND s.layer = i.layer AND s.expert = i.expert""", [run_id])],
           scores[["layer", "expert", "recon_error"]])


def save_knockout(path: str | Path, run_id: str, eval_set: str, rows: pd.DataFrame) -> None:
    """Store end-to-end knockout KL rows (layer, expert, tokens, kl, kl_ci_low, kl_ci_high) of one run."""
    frame = rows.assign(run_id=run_id, eval_set=eval_set, created_at=_now())
    write_frame(path, [("""DELETE FROM expert_knockout k WHERE run_id = ? AND eval_set = ? AND EXISTS
                      (SELECT 1 FROM incoming i WHERE i.layer = k.layer AND i.expert = k.expert)""", [run_id, eval_set]),
                  ("INSERT INTO expert_knockout BY NAME SELECT * FROM incoming", [])], frame)


def knockout(path: str | Path, run_ids: list[str]) -> pd.DataFrame:
    """Stored knockout rows of the given runs (newest evaluation set per run, layer and expert)."""
    with connect(path, read_only=True) as con:
        return con.execute("""SELECT * EXCLUDE (rn) FROM (
                                SELECT *, row_number() OVER (PARTITION BY run_id, layer, expert ORDER BY created_at DESC) rn
                                FROM expert_knockout WHERE run_id IN (SELECT unnest(?))) WHERE rn = 1
                              ORDER BY run_id, layer, expert""", [list(run_ids)]).df()
