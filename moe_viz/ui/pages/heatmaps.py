"""Heatmaps: a statistic or criterion over layers x experts, for one domain or the difference of two."""

import functools

import streamlit as st

from moe_viz.analysis import tables
from moe_viz.ui.app import page_path
from moe_viz.ui.common import CHART_HEIGHT, csv_download, layer_format, metric_values, pick_model
from moe_viz.ui.heatmap_chart import SELECTION, clicked_cell, heatmap_chart, heatmap_frame, heatmap_svg

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


def open_expert(layer: int, expert: int) -> None:
    st.session_state["ex_layer"] = int(layer)
    st.session_state["ex_expert"] = int(expert)
    st.switch_page(page_path("expert"))


st.title("Expert heatmaps")
model_id, run_ids = pick_model()
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
            f"{model_id} --domain {domain}` to fill it in.")
    st.stop()
matrix = tables.metric_matrix(values, domain)
matrix_b = tables.metric_matrix(values, domain_b) if domain_b is not None else None
log = domain_b is None and scale == "log"
frame = heatmap_frame(matrix, matrix_b, log=log)
title = f"{metric} — {domain}" + (f" minus {domain_b}" if domain_b is not None else "") + (" (log10)" if log else "")
event = st.altair_chart(heatmap_chart(frame, metric, unit(metric), title, domain, domain_b, log, CHART_HEIGHT),
                        key="heatmap", on_select="rerun", selection_mode=SELECTION, width="stretch")
cell = clicked_cell(event)  # handled before anything else is drawn: the page switches right away
if cell is not None and cell in {(int(l), int(e)) for l, e in zip(frame.layer, frame.expert)}:
    open_expert(*cell)

st.caption(tables.METRICS[metric] + ". Hover a cell for its value (6 significant digits; the CSV has full "
           "precision); click a cell to open that expert's detail (or pick a layer and expert below).")
d1, d2 = st.columns(2)
csv_download(frame, "heatmap", d1)
legend = f"{'log10 ' if log else ''}{metric}{', A − B' if domain_b is not None else ''} ({unit(metric)})"
svg = functools.partial(heatmap_svg, frame, title, legend, diverging=domain_b is not None)  # written on click
d2.download_button("SVG of this heatmap", svg,
                   file_name="heatmap.svg", mime="image/svg+xml", key="heatmap_svg", on_click="ignore",
                   icon=":material/download:")

c6, c7, c8 = st.columns([1, 1, 2])
layer = c6.selectbox("Layer", list(matrix.index), key="hm_layer", format_func=layer_format(run_ids.values()))
expert = c7.selectbox("Expert", list(matrix.columns), key="hm_expert")
shown = frame.set_index(["layer", "expert"]).value
c8.metric(f"{metric}{' A − B' if domain_b is not None else ''} at layer {layer}, expert {expert}",
          f"{shown.loc[(int(layer), int(expert))]:.6g}")
if c8.button("Open expert detail", key="hm_open"):
    open_expert(layer, expert)
