"""The real dashboard in headless Chromium: every page renders its main chart with no exception.

Screenshots land in test-artifacts/ (git-ignored). Needs Debian's `chromium`
(installed by .ci/run) and the `playwright` Python package.
"""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from moe_viz.cli import main
from tiny_models import SAMPLE_TEXT, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
PAGES = {  # url path -> what the page's main content is
    "": "stVegaLiteChart",  # the clickable heatmap (Altair)
    "overlap": "stPlotlyChart",
    "rankings": "stPlotlyChart",
    "expert": "stPlotlyChart",
    "tokens": "stPlotlyChart",
    "health": "stPlotlyChart",
    "prune": "stPlotlyChart",
    "compare": "stPlotlyChart",  # the cut trade-off draws without any stored evaluation
    "runs": "stDataFrame",
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    model_dir = save_tiny_model(root / "model")
    for name in ("code", "prose"):
        (root / f"{name}.txt").write_text(SAMPLE_TEXT * (20 if name == "code" else 35))
    store_path = root / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), "--domain", f"code={root / 'code.txt'}",
                 "--domain", f"prose={root / 'prose.txt'}", "--store", str(store_path), "--seq-len", "64"]) == 0
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--", "--store", str(store_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("streamlit did not start: " + process.stderr.read().decode()[-2000:])
    yield url
    process.terminate()
    try:  # a loaded machine can take several seconds to shut the server down
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_every_page_renders_in_chromium(server):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is required (apt-get install chromium; .ci/run does it)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        for path, main_element in PAGES.items():
            page.goto(f"{server}/{path}")
            page.wait_for_selector(f'[data-testid="{main_element}"]', timeout=60_000)
            page.wait_for_load_state("networkidle")
            name = path or "heatmaps"
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
            assert page.locator('[data-testid="stException"]').count() == 0, f"exception on {name}"
            if main_element == "stPlotlyChart":
                assert page.locator(".js-plotly-plot .main-svg").count() > 0, f"chart not drawn on {name}"
        browser.close()


def test_clicking_a_heatmap_cell_opens_that_expert(server):
    """A real click on the cell (layer 1, expert 5) opens Expert detail on layer 1, expert 5."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server)
        cells = page.locator('[data-testid="stVegaLiteChart"] g.mark-rect path')
        cells.first.wait_for(timeout=60_000)
        # Vega's SVG marks carry their encoded fields as an aria-label: "expert: 5; MoE layer (decoder index): 1; ..."
        labels = cells.evaluate_all("paths => paths.map(p => p.getAttribute('aria-label') || '')")
        fields = [dict(part.split(": ", 1) for part in label.split("; ") if ": " in part) for label in labels]
        found = [i for i, f in enumerate(fields) if f.get("expert") == "5" and f.get("MoE layer (decoder index)") == "1"]
        assert len(found) == 1, labels[:3]
        (index,) = found
        cells.nth(index).click()
        page.wait_for_url("**/expert", timeout=60_000)
        page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=60_000)
        # each picker is a combobox input labelled by its name, whose value is the chosen option
        chosen = {name: page.locator(f'[data-testid="stMain"] input[aria-label="{name}"]').input_value()
                  for name in ("Layer", "Expert")}
        assert chosen["Layer"] == "1" and chosen["Expert"] == "5", chosen
        page.screenshot(path=str(ARTIFACTS / "heatmap-click-expert.png"))
        # back on Heatmaps, the old click does not send the user away again
        page.locator('[data-testid="stSidebarNav"] a').first.click()
        page.wait_for_url(server + "/", timeout=60_000)
        cells.first.wait_for(timeout=60_000)
        page.wait_for_load_state("networkidle")
        assert page.url == server + "/"
        browser.close()


def test_heatmap_downloads_arrive_in_chromium(server, tmp_path):
    """The deferred CSV and SVG downloads are written on click and reach the browser whole."""
    import csv
    import xml.etree.ElementTree as ET

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page.goto(server)
        page.locator('[data-testid="stVegaLiteChart"] g.mark-rect path').first.wait_for(timeout=60_000)
        files = {}
        for label in ("CSV of this chart's data", "SVG of this heatmap"):
            with page.expect_download(timeout=60_000) as download:
                page.get_by_role("button", name=label).click()
            files[label] = tmp_path / download.value.suggested_filename
            download.value.save_as(files[label])
        browser.close()
    rows = list(csv.DictReader(files["CSV of this chart's data"].open()))
    assert files["CSV of this chart's data"].name == "heatmap.csv"
    assert len(rows) == 2 * 8 and set(rows[0]) == {"layer", "expert", "value", "colour"}  # 2 layers x 8 experts
    svg = ET.parse(files["SVG of this heatmap"]).getroot()
    assert len([r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if "data-layer" in r.attrib]) == 16
