"""Where the store lives, and filesystem checks of a store path made before anything is loaded or written.

Standard library only (no DuckDB), so the checks can also run in a bare
interpreter, e.g. as an unprivileged user in the tests. `store.check_store_path`
turns a problem into a one-line MoeVizError and adds the DuckDB-level checks.

The default store is `home() / "moe_viz.duckdb"`, whatever the current directory:
MOE_VIZ_HOME if set; else the checkout's cache/ when moe_viz runs from a source
checkout (editable installs included); else the user cache directory
($XDG_CACHE_HOME/moe_viz, or ~/.cache/moe_viz). Dashboard exports and background
jobs go beside the store (exports/, jobs/), so they follow the same home.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MOE_VIZ_HOME"
STORE_FILE = "moe_viz.duckdb"
PACKAGE_DIR = Path(__file__).resolve().parent


def source_checkout(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The repository root when the moe_viz package at `package_dir` is a source checkout's, else None.

    A checkout keeps the package beside the pyproject.toml that builds it; an installed
    wheel keeps it in site-packages, where no such pyproject.toml is.
    """
    root = Path(package_dir).parent
    try:
        pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if 'name = "moe_viz"' in pyproject else None


def home(environ: os._Environ | dict = os.environ, package_dir: Path = PACKAGE_DIR) -> Path:
    """The directory holding the default store, its exports/ and jobs/ (see the module docstring); absolute."""
    if environ.get(HOME_ENV):
        return Path(environ[HOME_ENV]).expanduser().absolute()
    root = source_checkout(package_dir)
    if root is not None:
        return root / "cache"
    cache = environ.get("XDG_CACHE_HOME", "")
    # the XDG spec ignores a relative XDG_CACHE_HOME
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "moe_viz"


def default_store(environ: os._Environ | dict = os.environ, package_dir: Path = PACKAGE_DIR) -> Path:
    """The store every command and the dashboard use when no --store is given (absolute)."""
    return home(environ, package_dir) / STORE_FILE


# A DuckDB database file has an 8-byte checksum, then these 4 bytes.
DUCKDB_MAGIC = b"DUCK"
_MAGIC_AT = 8


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (as anything)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def location_problem(path: str | Path, write: bool) -> str | None:
    """Why `path` cannot be a store to read (write=False) or to write (write=True); None if it can.

    Looks only at the filesystem: never creates, opens for writing, or changes anything.
    """
    path = Path(path).absolute()
    found = _nearest_existing(path)
    if found != path:
        if not found.is_dir():
            kind = "a file" if found.is_file() else "not a directory"
            return f"store {path}: {found} is {kind}, not a directory"
        if not write:
            return f"no store at {path}: run `moe-viz capture` or `moe-viz demo` first"
        if not os.access(found, os.W_OK | os.X_OK):
            return f"store {path}: directory {found} is not writable"
        return None
    if path.is_dir():
        return f"store {path} is a directory, not a DuckDB file"
    if not path.is_file():
        return f"store {path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"store {path} is not readable"
    with open(path, "rb") as f:
        header = f.read(_MAGIC_AT + len(DUCKDB_MAGIC))
    if header[_MAGIC_AT:] != DUCKDB_MAGIC:
        return f"store {path} is not a DuckDB database (no DuckDB header): choose another --store"
    if write:
        if not os.access(path, os.W_OK):
            return f"store {path} is read-only"
        # DuckDB writes its write-ahead log (NAME.wal) beside the file.
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"store {path}: directory {path.parent} is not writable (DuckDB writes {path.name}.wal there)"
    return None
