"""Repository contracts: CI runs exactly the README's test command; the app opens on any store."""

import re
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ci_lines[-1] == command


def test_app_without_store_shows_a_friendly_message(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["app.py", "--store", str(tmp_path / "missing.duckdb")])
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30)
    at.run()
    assert not at.exception
    assert "moe-viz" in at.info[0].value
