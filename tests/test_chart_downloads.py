"""Every chart on every page: a CSV download of the data it draws, and an SVG export.

Plotly charts save SVG from the modebar's camera (config toImageButtonOptions, drawn in the
browser); the Altair heatmap has an SVG download button of its own. The compare page's quality
curves, which need stored evaluations, are checked in test_compare_page.py.
"""

import io
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
from plotly.colors import sample_colorscale

from chart_downloads import check_plotly_downloads, downloads, offered  # noqa: F401 (fixture)
from test_ui import _app, _heatmap, captured  # noqa: F401 (fixture)

PAGES = ["heatmaps", "overlap", "rankings", "expert", "tokens", "health", "prune", "compare", "runs"]
EXPECTED_CHARTS = {"overlap": {"overlap_matrix", "overlap_mean", "overlap_mi"},
                   "rankings": {"ranking_bars", "agreement_matrix"}, "expert": {"expert_share", "expert_partners"},
                   "tokens": {"tr_routes", "tr_dependence"},
                   "health": {"health_imbalance", "health_entropy", "health_never"},
                   "prune": {"prune_mask", "prune_lost"}, "compare": {"cp_cut"}}


def test_every_plotly_chart_offers_its_data_as_csv_and_saves_svg(captured, monkeypatch, downloads):
    _, _, store_path = captured
    for page in PAGES:
        at = _app(store_path, monkeypatch, None if page == "heatmaps" else page)
        assert set(check_plotly_downloads(at, downloads, page)) == EXPECTED_CHARTS.get(page, set()), page
    at = _app(store_path, monkeypatch, "overlap")
    at.radio(key="ov_view").set_value("Lines across layers").run()
    assert set(check_plotly_downloads(at, downloads, "overlap lines")) == {"overlap_matrix", "overlap_lines",
                                                                            "overlap_mi"}


def test_heatmap_csv_is_the_charted_frame_and_svg_draws_every_cell(captured, monkeypatch, downloads):
    _, _, store_path = captured
    at = _app(store_path, monkeypatch)
    for view in ("One domain", "Difference A − B"):
        at.radio(key="hm_mode").set_value(view).run()
        _, charted = _heatmap(at)
        files = offered(at, downloads)
        csv = pd.read_csv(io.BytesIO(files["heatmap_csv"]))
        # the CSV has the exact values; the chart the same cells, rounded to 6 significant digits for the hover
        assert list(csv.columns) == (["layer", "expert", "value", "colour"] if view == "One domain"
                                     else ["layer", "expert", "a", "b", "value", "colour"])
        pd.testing.assert_frame_equal(csv[["layer", "expert"]], charted[["layer", "expert"]].reset_index(drop=True))
        for column in charted.columns[2:]:
            np.testing.assert_array_equal(charted[column], [float(f"{v:.6g}") for v in csv[column]])
        charted = csv  # the SVG draws the exact values
        svg = ET.fromstring(files["heatmap_svg"])
        cells = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if "data-layer" in r.attrib]
        assert len(cells) == len(charted)
        colour = charted.colour.to_numpy()
        if view == "One domain":
            low, high, scale = colour.min(), colour.max(), "Viridis"
        else:
            high = np.abs(colour).max()
            low, scale = -high, "RdBu_r"
        by_cell = charted.set_index(["layer", "expert"])
        for rect in cells:
            row = by_cell.loc[(int(rect.get("data-layer")), int(rect.get("data-expert")))]
            exact = sample_colorscale(scale, [(row.colour - low) / (high - low)], colortype="rgb")[0]
            # the fill is the scale's colour at this value, to one 8-bit step (the scale is sampled at 1024 levels)
            np.testing.assert_allclose(_rgb(rect.get("fill")), _rgb(exact), atol=1)
            assert f": {row.value:.6g}" in rect.find("{http://www.w3.org/2000/svg}title").text
        # the cell positions follow the chart's axes: layers down, experts across, in order
        x = {int(r.get("data-expert")): float(r.get("x")) for r in cells}
        y = {int(r.get("data-layer")): float(r.get("y")) for r in cells}
        assert sorted(x, key=x.get) == sorted(x) and sorted(y, key=y.get) == sorted(y)


def _rgb(colour: str) -> list[float]:
    return [float(c) for c in colour.removeprefix("rgb(").removesuffix(")").split(",")]
