"""One home for the store: MOE_VIZ_HOME, else the checkout's cache/, else the user cache directory.

Every command says which store it used, in its output and in its errors; the dashboard shows it.
(The installed-wheel default is also checked end to end in test_packaging.py.)
"""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from moe_viz.cli import main
from moe_viz.store_location import default_store, home, source_checkout
from tiny_models import SAMPLE_TEXT, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def test_checkout_home_is_its_cache_folder_whatever_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_VIZ_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert source_checkout(ROOT / "moe_viz") == ROOT
    assert home({}, ROOT / "moe_viz") == ROOT / "cache"
    assert default_store() == ROOT / "cache" / "moe_viz.duckdb"  # this test runs from a checkout


def test_installed_home_is_the_user_cache_directory(tmp_path, monkeypatch):
    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "moe_viz").mkdir(parents=True)
    assert source_checkout(site / "moe_viz") is None
    # a pyproject.toml of some other project beside the package does not make a checkout
    (site / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert source_checkout(site / "moe_viz") is None
    cache = tmp_path / "xdg"
    assert home({"XDG_CACHE_HOME": str(cache)}, site / "moe_viz") == cache / "moe_viz"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert home({}, site / "moe_viz") == tmp_path / "user" / ".cache" / "moe_viz"
    # the XDG spec says a relative XDG_CACHE_HOME is ignored
    assert home({"XDG_CACHE_HOME": "relative/cache"}, site / "moe_viz") == tmp_path / "user" / ".cache" / "moe_viz"


def test_moe_viz_home_wins_over_checkout_and_user_cache(tmp_path, monkeypatch):
    chosen = tmp_path / "chosen"
    assert home({"MOE_VIZ_HOME": str(chosen), "XDG_CACHE_HOME": str(tmp_path / "xdg")}, ROOT / "moe_viz") == chosen
    monkeypatch.chdir(tmp_path)
    assert home({"MOE_VIZ_HOME": "rel"}, ROOT / "moe_viz") == tmp_path / "rel"  # made absolute once, here
    monkeypatch.setenv("MOE_VIZ_HOME", str(chosen))
    assert default_store() == chosen / "moe_viz.duckdb"


@pytest.fixture(scope="module")
def home_store(tmp_path_factory):
    """A capture with no --store, MOE_VIZ_HOME set, run from another directory: its store and output."""
    root = tmp_path_factory.mktemp("home")
    model_dir = save_tiny_model(root / "model")
    (root / "code.txt").write_text(SAMPLE_TEXT * 20)
    return root, model_dir


def test_commands_use_moe_viz_home_and_print_the_store(home_store, tmp_path, monkeypatch, capsys):
    root, model_dir = home_store
    moe_home = tmp_path / "home"
    monkeypatch.setenv("MOE_VIZ_HOME", str(moe_home))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = moe_home / "moe_viz.duckdb"

    assert main(["capture", "--model", str(model_dir), "--domain", f"code={root / 'code.txt'}",
                 "--seq-len", "64", "--max-tokens", "300"]) == 0
    out = capsys.readouterr()
    assert store.is_file() and not (elsewhere / "cache").exists()
    assert f"moe-viz: store {store}\n" in out.err
    assert f"in {store}" in out.out

    # an error that would not otherwise name the store says which one it looked in
    assert main(["prune", "--model", str(model_dir), "--criterion", "reap", "--keep", "2", "--domain", "prose",
                 "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("moe-viz: error: ") and "prose" in err
    assert err.endswith(f"[store: {store}]")
    assert not (tmp_path / "export").exists()

    # an explicit --store is used as given (relative to the current directory) and printed absolute
    assert main(["prune", "--model", str(model_dir), "--criterion", "reap", "--keep", "2",
                 "--out", str(tmp_path / "export"), "--store", "mine.duckdb"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"moe-viz: error: no store at {elsewhere / 'mine.duckdb'}: run `moe-viz "
                                        "capture` or `moe-viz demo` first"]  # one line, naming the store once


def test_an_error_naming_the_store_as_given_does_not_name_it_again(tmp_path, monkeypatch, capsys):
    import duckdb

    monkeypatch.chdir(tmp_path)
    with duckdb.connect("foreign.duckdb") as con:  # someone else's DuckDB file
        con.execute("CREATE TABLE people (name VARCHAR)")
    assert main(["import-run", str(tmp_path / "no-run"), "--store", "foreign.duckdb"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "moe-viz: error: foreign.duckdb is a DuckDB database but not a moe_viz store (tables people, no schema_version): "
        "choose another --store"]


def test_ui_says_which_store_it_serves(tmp_path, monkeypatch, capsys):
    import subprocess

    monkeypatch.setenv("MOE_VIZ_HOME", str(tmp_path))
    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda command, env: seen.update(command=command) or 0)
    assert main(["ui", "--port", "8599"]) == 0
    store = tmp_path / "moe_viz.duckdb"
    assert f"dashboard: http://127.0.0.1:8599 on the store {store}" in capsys.readouterr().out
    assert seen["command"][-3:] == ["--", "--store", str(store)]
    assert Path(seen["command"][seen["command"].index("run") + 1]) == ROOT / "moe_viz" / "ui" / "app.py"


def test_dashboard_reads_and_shows_the_home_store(home_store, tmp_path, monkeypatch):
    root, model_dir = home_store
    monkeypatch.setenv("MOE_VIZ_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["capture", "--model", str(model_dir), "--domain", f"code={root / 'code.txt'}",
                 "--seq-len", "64", "--max-tokens", "300"]) == 0
    monkeypatch.setattr("sys.argv", ["app.py"])  # no --store
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("vega_lite_chart")) == 1  # the heatmap of the captured run, not "no store"
    assert f"store: `{tmp_path / 'moe_viz.duckdb'}`" in [c.value for c in at.sidebar.caption]


def test_the_default_store_has_one_name():
    """store.default_store (a re-export of store_location.default_store) is the one name; DEFAULT_STORE is gone."""
    from moe_viz import store, store_location

    assert store.default_store is store_location.default_store
    assert not hasattr(store, "DEFAULT_STORE")
