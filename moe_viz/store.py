"""The DuckDB store of capture runs and their statistics (schema: docs/STORE.md).

DuckDB lets only one process hold a file read-write, and that blocks every
reader. So nothing here keeps a connection open: each write opens the file,
commits one short transaction and closes it, and every open retries while
another process holds the lock. A dashboard can therefore read while a
capture runs; it only waits for the few milliseconds of each commit.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import pandas as pd

from .models import MoeVizError

DEFAULT_STORE = Path("cache") / "moe_viz.duckdb"
LOCK_TIMEOUT_S = 60.0

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
}
SCHEMA_VERSION = max(MIGRATIONS)
STAT_TABLES = ("expert_stats", "layer_stats", "coactivation")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflict" in text or "could not set" in text)


@contextmanager
def connect(path: str | Path, read_only: bool = False, timeout: float = LOCK_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the store briefly; waits while another process holds the file.

    A write connection creates the file and applies pending migrations. A
    read-only connection to a missing file raises MoeVizError.
    """
    path = Path(path)
    if read_only and not path.exists():
        raise MoeVizError(f"no store at {path}: run `moe-viz capture` or `moe-viz demo` first")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except (duckdb.IOException, duckdb.Error) as exc:
            if _is_lock_error(exc) and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
                continue
            if _is_lock_error(exc):
                raise MoeVizError(f"store {path} stayed locked by another process for {timeout:.0f}s") from exc
            raise MoeVizError(f"cannot open store {path}: {str(exc).splitlines()[0]}") from exc
    try:
        _check_schema(con, path, migrate=not read_only)
        yield con
    finally:
        con.close()


def _schema_version(con: duckdb.DuckDBPyConnection) -> int:
    try:
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    except duckdb.CatalogException:
        return 0  # a new, empty file


def _check_schema(con: duckdb.DuckDBPyConnection, path: Path, migrate: bool) -> None:
    version = _schema_version(con)
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


def settings_key(model_id: str, fingerprint: str, domain: str, source: str, settings: dict) -> str:
    # Where a capture ran does not change what it measures, so it is not part of the key.
    keyed = {k: v for k, v in settings.items() if k != "device"}
    payload = json.dumps([model_id, fingerprint, domain, source, keyed], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
    """Register a run as `running` and return its id."""
    run_id = uuid.uuid4().hex[:12]
    with connect(path) as con:
        con.execute(
            """INSERT INTO runs (run_id, model_id, model_fingerprint, model_type, domain, source, settings,
                                 settings_key, status, started_at, tool_version)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)""",
            [
                run_id,
                model_id,
                model_fingerprint,
                model_type,
                domain,
                source,
                json.dumps(settings, sort_keys=True),
                settings_key(model_id, model_fingerprint, domain, source, settings),
                _now(),
                tool_version,
            ],
        )
    return run_id


def complete_run(
    path: str | Path,
    run_id: str,
    *,
    expert_stats: pd.DataFrame,
    layer_stats: pd.DataFrame,
    coactivation: pd.DataFrame,
    tokens: int,
    sequences: int,
) -> None:
    """Write all of a run's rows and mark it complete, in one transaction.

    Earlier runs with the same settings key (same model, domain, source and
    settings) are deleted in the same transaction, so a re-capture replaces
    the old data atomically.
    """
    frames = {"expert_stats": expert_stats, "layer_stats": layer_stats, "coactivation": coactivation}
    with connect(path) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            key = con.execute("SELECT settings_key FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if key is None:
                raise MoeVizError(f"run {run_id} is not in the store")
            old = [r[0] for r in con.execute(
                "SELECT run_id FROM runs WHERE settings_key = ? AND run_id <> ?", [key[0], run_id]
            ).fetchall()]
            _delete_runs(con, old)
            for table, frame in frames.items():
                frame = frame.assign(run_id=run_id)
                con.register("incoming", frame)
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
                con.unregister("incoming")
            con.execute(
                """UPDATE runs SET status = 'complete', tokens = ?, sequences = ?, num_moe_layers = ?,
                                   finished_at = ?, error = NULL WHERE run_id = ?""",
                [tokens, sequences, len(layer_stats), _now(), run_id],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def _delete_runs(con: duckdb.DuckDBPyConnection, run_ids: list[str]) -> None:
    if not run_ids:
        return
    for table in STAT_TABLES + ("runs",):
        con.execute(f"DELETE FROM {table} WHERE run_id IN (SELECT unnest(?))", [run_ids])


def fail_run(path: str | Path, run_id: str, error: str) -> None:
    """Mark a run failed; any rows it may have are removed."""
    with connect(path) as con:
        con.execute("BEGIN TRANSACTION")
        for table in STAT_TABLES:
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        con.execute(
            "UPDATE runs SET status = 'failed', error = ?, finished_at = ? WHERE run_id = ?",
            [error[:2000], _now(), run_id],
        )
        con.execute("COMMIT")


def delete_runs(path: str | Path, run_ids: list[str]) -> None:
    """Remove runs and all their rows."""
    with connect(path) as con:
        con.execute("BEGIN TRANSACTION")
        _delete_runs(con, list(run_ids))
        con.execute("COMMIT")


# -- queries -----------------------------------------------------------------

def list_runs(path: str | Path, status: str | None = None) -> pd.DataFrame:
    """All runs, newest first (optionally only one status)."""
    query = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY started_at DESC"
    with connect(path, read_only=True) as con:
        return con.execute(query, [status] if status else []).df()


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
