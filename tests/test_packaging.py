"""The wheel built from this repository works outside it.

Builds the wheel (offline, no build isolation), installs it into a temporary venv that
reuses the installed dependencies, then from a directory outside the repository, with
no MOE_VIZ_HOME and no PYTHONPATH: `moe-viz capture` of the demo model shipped as package
data on two built-in domains lands in the user cache directory, and `moe-viz ui` serves the
packaged dashboard, which draws the heatmap of that store in headless Chromium.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import duckdb
from playwright.sync_api import sync_playwright

from test_browser import CHROMIUM_FLAGS, _free_port

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "moe_viz", source / "moe_viz", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("moe_viz-*.whl")
    return wheel


def test_wheel_installs_and_runs_from_any_directory(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"moe_viz/ui/app.py", "moe_viz/ui/pages/heatmaps.py", "moe_viz/demo/model/config.json",
            "moe_viz/demo/model/model.safetensors", "moe_viz/demo/model/tokenizer.json"} <= names
    assert not any(name.startswith(("tests/", "app.py")) for name in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the venv has no pip of its own; the system pip (seen through system site-packages) installs into it
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
                    str(wheel)], check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOE_VIZ_HOME")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), OMP_NUM_THREADS="1")
    store = tmp_path / "xdg" / "moe_viz" / "moe_viz.duckdb"
    installed = subprocess.run([str(python), "-c", "import moe_viz.demo as d; print(d.shipped_model())"],
                               cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    site_packages = next((venv / "lib").glob("python3.*/site-packages"))
    assert Path(installed) == site_packages / "moe_viz" / "demo" / "model"  # the wheel's copy, not the checkout

    captured = subprocess.run(
        [str(venv / "bin" / "moe-viz"), "--threads", "1", "capture", "--model", installed,
         "--domain", "code=builtin:code", "--domain", "multilingual=builtin:multilingual",
         "--max-tokens", "512", "--seq-len", "128"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert captured.returncode == 0, captured.stderr[-2000:]
    assert f"moe-viz: store {store}\n" in captured.stderr
    assert f"stored 2 run(s) in {store}" in captured.stdout
    assert list(elsewhere.iterdir()) == []  # nothing written where the command ran
    with duckdb.connect(str(store), read_only=True) as con:
        assert sorted(con.execute("SELECT domain, tokens FROM runs WHERE status = 'complete'").fetchall()) == [
            ("code", 512), ("multilingual", 512)]

    port = _free_port()
    server = subprocess.Popen([str(venv / "bin" / "moe-viz"), "ui", "--port", str(port)], cwd=elsewhere, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "moe-viz ui did not start"
                time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_selector('[data-testid="stPlotlyChart"], [data-testid="stVegaLiteChart"]', timeout=90_000)
            assert page.locator('[data-testid="stException"]').count() == 0
            assert str(store) in page.locator('[data-testid="stSidebar"]').inner_text()
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the session started above: moe-viz and its streamlit child
        try:  # a loaded machine can take several seconds to shut the server down
            output = server.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            output = server.communicate()[0].decode()
    assert "Traceback" not in output, output[-2000:]


def test_requirements_pin_a_set_that_satisfies_the_package_dependencies():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            (version,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            pins[requirement.name.lower()] = version
    for requirement in declared:
        assert requirement.name.lower() in pins, f"{requirement.name} is not pinned in requirements.txt"
        assert requirement.specifier.contains(pins[requirement.name.lower()]), requirement
    assert pins["torch"] == "2.13.0"
    assert "-e ." in (ROOT / "requirements.txt").read_text().splitlines()  # CI installs the package from the checkout
