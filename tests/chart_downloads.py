"""Checks shared by the download tests: each chart's CSV holds the numbers it draws; SVG export is on."""

import io
import json

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest
from streamlit.runtime.media_file_manager import MediaFileManager


@pytest.fixture
def downloads(monkeypatch):
    """deferred file id -> the function a download button runs when clicked (recorded as Streamlit registers it)."""
    files = {}
    original = MediaFileManager.add_deferred

    def record(self, data_callable, *args, **kwargs):
        file_id = original(self, data_callable, *args, **kwargs)
        files[file_id] = data_callable
        return file_id

    monkeypatch.setattr(MediaFileManager, "add_deferred", record)
    return files


def element_key(element) -> str:
    """The key a page gave an element (Streamlit ids read $$ID-<hash>-<key>)."""
    return element.proto.id.split("-", 2)[2]


def offered(at, downloads) -> dict[str, bytes]:
    """Download button key -> the bytes it gives when clicked (every button is deferred: nothing is made per rerun)."""
    files = {}
    for button in at.get("download_button"):
        assert button.proto.deferred_file_id and not button.proto.url, element_key(button)
        data = downloads[button.proto.deferred_file_id]()
        files[element_key(button)] = data.encode() if isinstance(data, str) else data
    return files


def plotted_numbers(figure) -> np.ndarray:
    """Every finite number the traces draw (x, y, z; categorical labels that read as numbers too)."""
    numbers = []
    for trace in figure.data:
        for name in ("x", "y", "z"):
            values = getattr(trace, name, None)
            if values is None:
                continue
            if isinstance(values, dict) and "bdata" in values:
                from test_ui import _array

                values = _array(values)
            flat = pd.to_numeric(pd.Series(np.asarray(values, dtype=object).ravel()), errors="coerce")
            numbers.append(flat.dropna().to_numpy(dtype=float))
    return np.concatenate(numbers) if numbers else np.array([])


def check_plotly_downloads(at, downloads, where: str) -> list[str]:
    """Assert every Plotly chart on the page saves SVG and offers a CSV holding every number it draws."""
    files = offered(at, downloads)
    keys = []
    for chart in at.get("plotly_chart"):
        key = element_key(chart)
        keys.append(key)
        assert json.loads(chart.proto.config)["toImageButtonOptions"] == {"format": "svg", "filename": key}, key
        assert f"{key}_csv" in files, f"{where}: chart {key} has no CSV download"
        csv = pd.read_csv(io.BytesIO(files[f"{key}_csv"]))
        numbers = csv.select_dtypes("number").to_numpy(dtype=float).ravel()
        plotted = plotted_numbers(pio.from_json(chart.proto.spec))
        assert plotted.size, f"{where}: {key} draws nothing"
        missing = [v for v in plotted if not np.isclose(numbers, v, rtol=1e-12, atol=0).any()]
        assert not missing, f"{where}: {key} draws numbers its CSV lacks: {missing[:5]}"
    return keys
