"""Heatmaps: a statistic or criterion over layers x experts, for one domain or the difference of two."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from moe_viz.analysis import tables
from moe_viz.ui.app import page_path
from moe_viz.ui.common import CHART_HEIGHT, COLOR_DIVERGING, COLOR_SEQUENTIAL, domain_run_ids, metric_values, pick_model_runs

# the unit of each statistic or criterion, for the colour bar and the hover
UNITS = {
    "frequency_share": "fraction of the layer's k·T slots",
    "top1_share": "fraction of tokens",
    "soft_count_mean": "router probability per token",
    "gate_mass_mean": "gate weight per token",
    "ean_max": "‖f_e(x)‖, L2 norm",
    "frequency": "routed tokens",
    "soft_count": "router probability, summed over tokens",
    "gate_mass": "gate weight, summed over routed tokens",
    "ean_mean": "‖f_e(x)‖, mean over routed tokens",
    "ean_sum": "‖f_e(x)‖, summed over routed tokens",
    "weighted_ean": "gate·‖f_e(x)‖, summed over routed tokens",
    "reap": "gate·‖f_e(x)‖, mean over routed tokens",
    "nllb": "top-1 share·e^(mean top-1 probability)",
    "easy_ep": "gate·‖f_e(x)‖·(1 − cos), summed",
    "reconstruction": "relative block-output error",
}


def unit(metric: str) -> str:
    return UNITS.get(metric, tables.METRICS[metric])


st.title("Expert heatmaps")
model_runs = pick_model_runs()
run_ids = domain_run_ids(model_runs)
domains = list(run_ids)

c1, c2, c3 = st.columns([2, 1, 1])
metric = c1.selectbox("Statistic or criterion", list(tables.METRICS), key="hm_metric",
                      format_func=lambda m: f"{m} — {tables.METRICS[m]}")
mode = c2.radio("View", ["One domain", "Difference A − B"], key="hm_mode", horizontal=True)
scale = c3.radio("Colour scale", ["linear", "log"], key="hm_scale", horizontal=True, disabled=mode != "One domain")
c4, c5 = st.columns(2)
domain = c4.selectbox("Domain" if mode == "One domain" else "Domain A", domains, key="hm_domain")
domain_b = None
if mode != "One domain":
    domain_b = c5.selectbox("Domain B", domains, index=min(1, len(domains) - 1), key="hm_domain_b")

values = metric_values(run_ids.values(), metric)
if values.value.isna().all():
    st.info(f"{metric} is measured, not derived from routing: run `moe-viz importance --model "
            f"{model_runs.model_id.iloc[0]} --domain {domain}` to fill it in.")
    st.stop()
matrix = tables.metric_matrix(values, domain)
hover = f"{metric} %{{customdata:.6g}} ({unit(metric)})"
if domain_b is not None:
    matrix_a, matrix_b = matrix, tables.metric_matrix(values, domain_b)
    matrix = matrix_a - matrix_b
exact = matrix.to_numpy(dtype=float)
customdata = exact
shown = exact
colour = dict(colorscale=COLOR_SEQUENTIAL)
title = f"{metric} — {domain}"
bar_title = f"{metric}<br>({unit(metric)})"
if domain_b is not None:
    limit = float(np.nanmax(np.abs(exact))) or 1.0
    colour = dict(colorscale=COLOR_DIVERGING, zmid=0.0, zmin=-limit, zmax=limit)
    title = f"{metric} — {domain} minus {domain_b}"
    bar_title = f"{metric}, A − B<br>({unit(metric)})"
    # hover shows both sides and the difference: customdata[..., 0] = A, [..., 1] = B, [..., 2] = A − B
    customdata = np.stack([side.reindex(index=matrix.index, columns=matrix.columns).to_numpy(dtype=float)
                           for side in (matrix_a, matrix_b)] + [exact], axis=-1)
    hover = (f"{metric} ({unit(metric)})<br>A {domain}: %{{customdata[0]:.6g}}<br>B {domain_b}: %{{customdata[1]:.6g}}"
             "<br>A − B: %{customdata[2]:.6g}")
elif scale == "log":
    positive = exact[exact > 0]
    floor = positive.min() / 10 if positive.size else 1e-12
    shown = np.log10(np.maximum(exact, floor))
    title += " (log10)"
    bar_title = f"log10 {metric}<br>({unit(metric)})"
figure = go.Figure(go.Heatmap(
    z=shown, x=[str(e) for e in matrix.columns], y=[str(l) for l in matrix.index], customdata=customdata,
    hovertemplate=f"layer %{{y}}<br>expert %{{x}}<br>{hover}<extra></extra>",
    colorbar=dict(title=bar_title), **colour,
))
figure.update_layout(title=title, xaxis_title="expert", yaxis_title="MoE layer (decoder index)",
                     height=CHART_HEIGHT, margin=dict(l=60, r=20, t=50, b=50))
figure.update_yaxes(autorange="reversed", type="category")
figure.update_xaxes(type="category")
st.plotly_chart(figure, key="heatmap")
st.caption(tables.METRICS[metric] + ". Hover a cell for exact values; pick a cell below to open its detail.")

c6, c7, c8 = st.columns([1, 1, 2])
layer = c6.selectbox("Layer", list(matrix.index), key="hm_layer")
expert = c7.selectbox("Expert", list(matrix.columns), key="hm_expert")
c8.metric(f"{metric}{' A − B' if domain_b is not None else ''} at layer {layer}, expert {expert}", f"{matrix.loc[layer, expert]:.6g}")
if c8.button("Open expert detail", key="hm_open"):
    st.session_state["ex_layer"] = int(layer)
    st.session_state["ex_expert"] = int(expert)
    st.switch_page(page_path("expert"))
