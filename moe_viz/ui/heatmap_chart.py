"""The clickable layer x expert heatmap: Altair rects whose click names the (layer, expert) cell.

Streamlit 1.67's `st.plotly_chart(on_select=...)` returns no points for a Plotly heatmap; a
Vega-Lite point selection on `mark_rect` does return the clicked cell. One mark per cell costs
the browser (94 x 512: docs/BENCHMARKS.md), so it evaluates few expressions per cell: scale
domains are given, and the hover shows the datum itself, whose columns chart_data names and
rounds. No Streamlit import here:
the page draws the chart and passes its event to `clicked_cell`.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

SELECTION = "cell"  # the point-selection parameter: st.altair_chart's event.selection.cell
SEQUENTIAL_SCHEME = "viridis"  # perceptually uniform and colour-blind safe
MAX_AXIS_LABELS = 48
DIVERGING_SCHEME = "redblue"  # reversed below: blue < 0 < red, readable with red-green colour blindness


def heatmap_frame(matrix: pd.DataFrame, matrix_b: pd.DataFrame | None = None, log: bool = False) -> pd.DataFrame:
    """The long table behind the heatmap, one row per (layer, expert).

    matrix, matrix_b: layer x expert values (index layer, columns expert). Columns: layer,
    expert, value (the exact value: A − B when matrix_b is given), `a` and `b` (difference
    only), and `colour` (what the colour encodes: log10 of value, floored at a tenth of the
    smallest positive value, when log; else value).
    """
    frame = _long(matrix, "value")
    if matrix_b is not None:
        frame = frame.rename(columns={"value": "a"})
        frame["b"] = _long(matrix_b.reindex(index=matrix.index, columns=matrix.columns), "b")["b"].to_numpy()
        frame["value"] = frame.a - frame.b
    values = frame.value.to_numpy(dtype=float)
    if log:
        positive = values[values > 0]
        floor = positive.min() / 10 if positive.size else 1e-12
        frame["colour"] = np.log10(np.maximum(np.nan_to_num(values, nan=floor), floor))
        frame.loc[np.isnan(values), "colour"] = np.nan
    else:
        frame["colour"] = values
    return frame


def _long(matrix: pd.DataFrame, name: str) -> pd.DataFrame:
    layers, experts = np.meshgrid(matrix.index.to_numpy(), matrix.columns.to_numpy(), indexing="ij")
    return pd.DataFrame({"layer": layers.ravel().astype(int), "expert": experts.ravel().astype(int),
                         name: matrix.to_numpy(dtype=float).ravel()})


def chart_data(frame: pd.DataFrame, metric: str, unit: str, domain: str, domain_b: str | None = None,
               log: bool = False) -> tuple[pd.DataFrame, str]:
    """What the browser gets, and the name of its colour column: layer, expert, the hover's values, unit.

    The hover shows the datum as it is, so the columns are named as it shows them: the statistic
    (e.g. frequency_share), or "A code", "B prose" and "A minus B" for a difference, plus "log10
    frequency_share" on a log scale and a "unit" column; values are rounded to 6 significant digits.
    Streamlit evaluates Vega expressions with an interpreter, once per cell and expression: a tooltip
    built from formatted fields cost a 94 x 512 heatmap seconds to draw (bench/heatmap_page.py).
    The exact values stay in `frame` (the CSV). The colour column's name is letters, digits, spaces
    and underscores only (a field with punctuation drew no chart in Streamlit 1.67).
    """
    data = frame[["layer", "expert"]].copy()
    if domain_b is not None:
        data[f"A {domain}"] = _six_digits(frame.a)
        data[f"B {domain_b}"] = _six_digits(frame.b)
        data["A minus B"] = _six_digits(frame.value)
    else:
        data[metric] = _six_digits(frame.value)
    if log:
        data[f"log10 {metric}"] = _six_digits(frame.colour)
    data["unit"] = pd.Categorical([unit] * len(data))
    # Streamlit hands Vega a numeric index as a field "(index)", which the hover would show
    data.index = pd.CategoricalIndex([""] * len(data))
    return data, data.columns[-2]


def _six_digits(values: pd.Series) -> np.ndarray:
    """Values rounded to 6 significant digits (NaN stays NaN): a float whose shortest text is its 6-digit form."""
    return np.array([float(f"{v:.6g}") for v in values.to_numpy(dtype=float)])


def heatmap_chart(frame: pd.DataFrame, metric: str, unit: str, title: str, domain: str,
                  domain_b: str | None = None, log: bool = False, height: int = 460) -> alt.Chart:
    """Rects coloured by `frame.colour`; hover shows layer, expert and the values with their unit.

    A difference (domain_b given) uses a diverging scale centred at 0 and its hover shows A, B and A − B.
    Clicking a cell selects it (parameter SELECTION, fields layer and expert). Every scale's domain is
    given, so the browser computes none over the cells; the hover is the datum itself (chart_data).
    """
    cell = alt.selection_point(name=SELECTION, fields=["layer", "expert"], on="click")
    data, colour_column = chart_data(frame, metric, unit, domain, domain_b, log)
    colour = frame.colour.to_numpy(dtype=float)  # the exact values: the scale's ends are not rounded
    finite = colour[np.isfinite(colour)]
    if domain_b is not None:
        limit = float(np.abs(finite).max()) if finite.size else 0.0
        limit = limit or 1.0
        scale = alt.Scale(scheme=DIVERGING_SCHEME, reverse=True, domain=[-limit, limit], domainMid=0)
        legend = [f"{metric}, A − B", f"({unit})"]
    else:
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        scale = alt.Scale(scheme=SEQUENTIAL_SCHEME, domain=[low, high])
        legend = [f"log10 {metric}" if log else metric, f"({unit})"]
    layers = sorted(int(v) for v in frame.layer.unique())
    experts = sorted(int(v) for v in frame.expert.unique())
    return (
        alt.Chart(data, title=title, height=height)
        .mark_rect(tooltip={"content": "data"})
        .encode(
            # at most ~MAX_AXIS_LABELS labels per axis: a 512-expert axis would lay out (and thin) 512 of them
            x=alt.X("expert:O", title="expert", scale=alt.Scale(domain=experts),
                    axis=alt.Axis(values=_ticks(experts))),
            y=alt.Y("layer:O", title="MoE layer (decoder index)", scale=alt.Scale(domain=layers),
                    axis=alt.Axis(values=_ticks(layers))),
            color=alt.Color(f"{colour_column}:Q", scale=scale, title=legend),
        )
        .add_params(cell)
    )


def _ticks(ordered: list[int]) -> list[int]:
    """Every value when there are few; else every n-th, so that at most MAX_AXIS_LABELS are drawn."""
    step = -(-len(ordered) // MAX_AXIS_LABELS)
    return ordered[::step]


def clicked_cell(event) -> tuple[int, int] | None:
    """(layer, expert) of the clicked cell in st.altair_chart's event, or None when nothing is selected.

    The event is {"selection": {SELECTION: [{"layer": L, "expert": E, ...}]}}, an empty list or
    dict when nothing is selected (shift-click adds points: the last one is the newest).
    """
    selection = (event or {}).get("selection", {}).get(SELECTION) or []
    if not isinstance(selection, list) or not selection:
        return None
    point = selection[-1]
    try:
        return int(point["layer"]), int(point["expert"])
    except (KeyError, TypeError, ValueError):
        return None


COLOUR_LEVELS = 1024  # SVG fills: the colour scale sampled at this many levels (within one 8-bit step of exact)


def heatmap_svg(frame: pd.DataFrame, title: str, legend: str, diverging: bool = False, cell: int = 18) -> str:
    """The heatmap as a standalone SVG (st.altair_chart has no export menu in Streamlit 1.67).

    One <rect> per (layer, expert) coloured on the chart's scale (Viridis, or RdBu reversed
    and centred at 0 for a difference; sampled at COLOUR_LEVELS levels) with the exact value
    in its <title> tooltip, axis labels, and a legend with the colour range. NaN cells are
    light grey. Vectorised: a 94 x 512 heatmap takes well under a second.
    """
    from xml.sax.saxutils import escape

    from plotly.colors import sample_colorscale

    layers, experts = np.sort(frame.layer.unique()), np.sort(frame.expert.unique())
    colour = frame.colour.to_numpy(dtype=float)
    finite = colour[np.isfinite(colour)]
    if diverging:
        limit = float(np.abs(finite).max()) if finite.size else 0.0
        low, high, scale = -(limit or 1.0), limit or 1.0, "RdBu_r"
    else:
        scale = "Viridis"
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        low, high = (low, high) if high > low else (low - 0.5, high + 0.5)  # one value: a range to map it into
    palette = np.array(sample_colorscale(scale, list(np.linspace(0, 1, COLOUR_LEVELS)), colortype="rgb") + ["#dddddd"])
    level = np.round((np.nan_to_num(colour, nan=low) - low) / (high - low) * (COLOUR_LEVELS - 1)).astype(int)
    fills = palette[np.where(np.isfinite(colour), np.clip(level, 0, COLOUR_LEVELS - 1), COLOUR_LEVELS)]
    left, top = 50, 40
    xs = left + cell * np.searchsorted(experts, frame.expert.to_numpy())
    ys = top + cell * np.searchsorted(layers, frame.layer.to_numpy())
    width, height = left + cell * len(experts) + 120, top + cell * len(layers) + 50
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="10"><text x="{left}" y="20" font-size="13">{escape(title)}</text>']
    parts += [f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" data-layer="{row.layer}" '
              f'data-expert="{row.expert}"><title>{escape(_cell_text(row))}</title></rect>'
              for x, y, fill, row in zip(xs, ys, fills, frame.itertuples(index=False))]
    parts += [f'<text x="{left - 4}" y="{top + cell * i + cell * 0.7}" text-anchor="end">{layer}</text>'
              for i, layer in enumerate(layers)]
    parts += [f'<text x="{left + cell * i + cell / 2}" y="{top + cell * len(layers) + 12}" text-anchor="middle">'
              f'{expert}</text>' for i, expert in enumerate(experts)]
    parts.append(f'<text x="{left}" y="{height - 8}">expert (x) · MoE layer (y)</text>')
    legend_x = left + cell * len(experts) + 20
    stops = "".join(f'<stop offset="{t:.2f}" stop-color="{c}"/>' for t, c in
                    zip(np.linspace(0, 1, 11), sample_colorscale(scale, list(np.linspace(0, 1, 11)), colortype="rgb")))
    parts.append(f'<defs><linearGradient id="legend" x1="0" y1="1" x2="0" y2="0">{stops}</linearGradient></defs>'
                 f'<rect x="{legend_x}" y="{top}" width="12" height="{cell * len(layers)}" fill="url(#legend)"/>'
                 f'<text x="{legend_x + 16}" y="{top + 8}">{high:.4g}</text>'
                 f'<text x="{legend_x + 16}" y="{top + cell * len(layers)}">{low:.4g}</text>'
                 f'<text x="{legend_x}" y="{top - 6}">{escape(legend)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _cell_text(row) -> str:
    text = f"layer {row.layer}, expert {row.expert}: {row.value:.6g}"
    if hasattr(row, "a"):
        text += f" (A {row.a:.6g}, B {row.b:.6g})"
    return text
