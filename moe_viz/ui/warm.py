"""What the dashboard loads ahead of time, in a background thread, so that no page's first visit pays for it.

A page's first visit used to import and build things for the first time: Plotly imports the
graph objects and validators of each trace type and layout part lazily, on the first figure
that uses them (70 modules on the first Plotly page); Altair loads the Vega-Lite schema on its
first `to_dict`; pages and common.py import modules inside functions. Besides their own cost,
any new module makes Streamlit's file watcher (on under `streamlit run app.py`:
.streamlit/config.toml) rescan every loaded module's path when the run ends, ~0.3 s of CPU on
the server's event loop with the ~3,800 modules loaded here, before the page's "finished"
message goes out (bench/dashboard.py --browser). warm_up() does it all once, while the user
reads the first page, then freezes what is loaded out of the garbage collector's reach: full
collections traversed it all during page runs, most of a page change's server CPU.

No Streamlit API is called here (it must not be called from a thread of one's own); only
imports and throwaway figures.
"""

from __future__ import annotations

import ast
import atexit
import gc
import importlib
from pathlib import Path

UI_DIR = Path(__file__).resolve().parent
# Streamlit imports this on a page's first st.dataframe (1.67); the first page (Heatmaps) has none.
STREAMLIT_LAZY = ["streamlit.dataframe.lazy_df_adapters"]


def page_modules() -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every import statement in the dashboard's code: pages, common.py, charts.

    Absolute imports anywhere in the files, function bodies included (pages and common.py import
    some modules only where they are used); `names` are the `from ... import` names, which may be
    submodules.
    """
    found: dict[tuple[str, tuple[str, ...]], None] = {}
    for path in sorted(UI_DIR.glob("*.py")) + sorted((UI_DIR / "pages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update({(alias.name, ()): None for alias in node.names})
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found[(node.module, tuple(alias.name for alias in node.names))] = None
    return list(found)


def warm_plotly() -> None:
    """Build and serialise, as st.plotly_chart does, one throwaway figure of every kind the pages draw.

    Bar, line (markers, one trace per domain) and grouped-bar Plotly Express figures, go.Heatmap,
    go.Scatter and go.Bar in subplots, with the layout parts the pages set (axes, shapes, lines,
    annotations, colour bars): each loads its graph-object classes and validators once.
    """
    import pandas as pd
    import plotly.express as px
    import plotly.graph_objects as go
    import plotly.io
    import plotly.tools  # noqa: F401  (st.plotly_chart imports it)
    from plotly.subplots import make_subplots

    frame = pd.DataFrame({"x": ["a", "b", "a", "b"], "y": [1.0, 2.0, 3.0, 4.0], "group": ["p", "p", "q", "q"]})
    bars = px.bar(frame, x="x", y="y", color="group", barmode="group", title="t", labels={"y": "y"})
    bars.add_hline(y=1.5, line_dash="dash", line_color="grey", annotation_text="h")
    lines = px.line(frame, x="x", y="y", color="group", markers=True, title="t", labels={"y": "y"})
    shaded = px.bar(frame, x="x", y="y", color="y", color_continuous_scale="Viridis", hover_data=["group"])
    grid = make_subplots(rows=1, cols=2, subplot_titles=["a", "b"])
    grid.add_trace(go.Heatmap(z=[[1.0, 2.0], [3.0, 4.0]], x=["a", "b"], y=["c", "d"], colorscale="RdBu_r", zmid=0,
                              colorbar={"title": "c"}, hovertemplate="%{z}<extra></extra>"), row=1, col=1)
    grid.add_trace(go.Scatter(x=[1, 2], y=[3, 4], mode="lines+markers", name="s", line={"dash": "dot"},
                              marker={"size": 4}), row=1, col=2)
    grid.add_trace(go.Bar(x=["a", "b"], y=[1, 2], marker_color=["#0072B2", "#E69F00"], name="b", customdata=[[1], [2]],
                          error_y={"type": "data", "symmetric": False, "array": [1, 1], "arrayminus": [1, 1]}),
                   row=1, col=2)
    grid.add_shape(type="rect", x0=0, x1=1, y0=0, y1=1, line={"color": "grey"})
    figures = [bars, lines, shaded, grid, go.Figure(go.Heatmap(z=[[1.0]]))]
    for figure in figures:
        figure.update_xaxes(type="category", categoryorder="array", categoryarray=["a", "b"], title="x")
        figure.update_yaxes(title="y", autorange="reversed")
        figure.update_layout(height=300, yaxis_range=[0, 1], legend_title_text="l", margin={"t": 40})
        plotly.io.to_json(figure, validate=False)


def warm_altair() -> None:
    """A tiny chart of the heatmap's kind (rects, a click selection) to_dict: loads the Vega-Lite schema once."""
    import altair as alt
    import pandas as pd

    cell = alt.selection_point(name="warm", fields=["a"], on="click")
    chart = (alt.Chart(pd.DataFrame({"a": [1], "b": [2.0]}), title="t").mark_rect(tooltip={"content": "data"})
             .encode(x=alt.X("a:O", axis=alt.Axis(values=[1])), color=alt.Color("b:Q", scale=alt.Scale(scheme="viridis")))
             .add_params(cell))
    chart.to_dict()


def warm_pandas() -> None:
    """pandas imports its reshaping code on the first DataFrame.stack (the Prune page's mask table)."""
    import pandas as pd

    pd.DataFrame([[1.0]]).stack()


def warm_up() -> None:
    """Everything a page's first visit would otherwise import or build for the first time (see the module doc).

    Plotly first (the likely next page), then the pages' own imports (the prune pages pull in
    transformers and torch), then Altair (the first page has usually loaded it already).
    """
    warm_plotly()
    warm_pandas()
    for module, names in page_modules():
        try:
            __import__(module, fromlist=names)  # what `from module import names` does: submodules included
        except ImportError:  # an optional dependency a page imports only where it is present
            pass
    # transformers' lazy submodules: common.model_config's AutoConfig, and what every model class that
    # plan.size_summary builds (on the meta device) imports: modeling_utils (scipy, PIL, ...), layers, generation,
    # masks. The model family's own config and modeling modules depend on the store's models: left to their first use.
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_layers  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    for module in STREAMLIT_LAZY:
        importlib.import_module(module)
    warm_altair()
    # What is loaded now lives as long as the server (~0.5M objects): every full collection would traverse it
    # again (~0.25 s CPU each, in the middle of some page's run). Frozen, collections skip it; collected first,
    # so that the throwaway figures' reference cycles are not frozen with it; unfrozen at exit, so that the
    # interpreter's last collection finalises it (nanobind would report DuckDB's type objects as leaked).
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)
